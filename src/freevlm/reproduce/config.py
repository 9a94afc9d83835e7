"""What `freevlm reproduce` runs: the default 3-seed configuration and the few-minute `--quick` one."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from freevlm.baselines import BASELINES
from freevlm.data.synthetic import SyntheticConfig
from freevlm.default import DefaultConfig
from freevlm.demo import demo_stage1, demo_stage2
from freevlm.real import RealConfig, real_stage2
from freevlm.train.contrastive import ClipConfig
from freevlm.train.loop import LoopConfig, OptimConfig
from freevlm.train.pretrain import WarmupConfig
from freevlm.train.stage1 import Stage1Config
from freevlm.train.stage2 import ExitTrainConfig


@dataclass
class ReproduceConfig:
    default: DefaultConfig = field(default_factory=DefaultConfig)
    real: RealConfig | None = None  # the real embedded VLM (`freevlm.real`) instead of the embedded default
    stage1: Stage1Config | None = field(default_factory=demo_stage1)  # None: the backbone is used as given
    stage2: ExitTrainConfig = field(default_factory=lambda: replace(demo_stage2(), loop=LoopConfig(epochs=2,
                                                                                                    batch_size=32)))
    seeds: int = 3
    methods: tuple[str, ...] = ("FREE", *BASELINES)
    ablations: tuple[str, ...] = ("no-adversarial",)  # --full adds no-ce and no-kd
    dev_images: int = 40  # development images for choosing each method's setting (and Fig. 3)
    test_images: int = 120  # test images scored per table row
    nocaps_images: int = 40  # per domain
    speed_images: int = 4  # images timed at batch 1 for the wall-clock column (2 paths x 4 passes each)
    eval_batch_size: int = 128  # images per generate call when scoring (results do not depend on it)
    noise_sigmas: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0)
    per_layer: bool = True  # Fig. 3
    per_layer_layers: tuple[int, ...] | None = None  # Fig. 3's layers (None: every layer below the last)
    unsupervised: bool = True  # Table 9: KD vs CapFilt
    capfilt_images: int = 200  # images pseudo-labelled by CapFilt (10 candidates each)
    capfilt_ranker: str = "tiny-clip"  # Table 9's ranker: the embedded default's CLIP, likelihood, random or a folder
    ranker_images: int = 100  # dev images whose samples every ranker ranks (the rankers table; 100 = the whole dev)
    visdial_dialogs: int = 20  # --full: dialogues (3 rounds x 100 candidates each) scored for VisDial MRR
    plan: bool = True  # `freevlm plan` on each seed's FREE exits: the "FREE + plan" rows and the exit-plan section
    speculative_dev_images: int = 16  # dev images (batch 1) timing each drafter's draft settings (tables/speculative)
    plan_train_images: int | None = None  # training images the exit planner sees (None: the seed's whole split)
    plan_dev_images: int | None = None  # dev images it decodes candidates on (None: the dev split)
    plan_candidates: int = 8  # candidates it decodes on dev at most
    plan_thresholds: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # alphas it trains gates for and predicts
    plan_spec_images: int = 16  # dev images it decodes per draft setting


def quick_config() -> ReproduceConfig:
    """A few-minute version for CI: tiny data and model, one seed, FREE + two baselines."""
    from freevlm.backbones.tiny import TinySize

    default = DefaultConfig(
        data=SyntheticConfig(n_train=96, n_val=60, n_test=20, n_nocaps=6, n_dialogs=4, captions_per_image=2),
        model=TinySize(lm_layers=6, lm_hidden=48, lm_ffn=96, vision_hidden=32, vision_layers=1, qformer_layers=1,
                       image_size=64, patch_size=16, num_query_tokens=4),
        pretrain=Stage1Config(train_parts=("vision", "qformer", "projection", "lm"), optim=OptimConfig(lr=2e-3),
                              loop=LoopConfig(epochs=1, batch_size=32)),
        warmup=WarmupConfig(steps=10, batch_size=32),
        clip=ClipConfig(hidden=32, ffn=64, layers=1, patch_size=16, hard_negatives=1,
                        loop=LoopConfig(epochs=1, batch_size=64)),
    )
    return ReproduceConfig(
        default=default, stage1=Stage1Config(loop=LoopConfig(epochs=1, batch_size=16)),
        stage2=ExitTrainConfig(exit_layers=[2, 4], discriminator_hidden=64, discriminator_lr=1e-4,
                               optim=OptimConfig(lr=1e-3, warmup_steps=2), loop=LoopConfig(epochs=1, batch_size=16)),
        seeds=1, methods=("FREE", "DeeBLIP", "MuE"), dev_images=12, test_images=12, nocaps_images=4, speed_images=2,
        noise_sigmas=(0.0, 1.0), capfilt_images=8, ranker_images=8, speculative_dev_images=4, plan_train_images=24,
        plan_dev_images=8, plan_candidates=3, plan_spec_images=4, plan_thresholds=(0.7, 0.9),
    )


def real_config() -> ReproduceConfig:
    """`reproduce --real`: one seed on the real embedded VLM (SmolLM2-135M-Instruct), FREE, the four baselines, the
    adversarial ablation and the per-layer study, sized for about an hour on 2 CPU cores.

    The backbone is the real VLM after its own stage 1 (the projection, `freevlm.real`), so there is no further
    fine-tune. Each linear baseline exit is a 576 x 49,153 classifier (28M parameters, trained beside the others in
    one pass), so Fig. 3's vanilla heads sit at every fifth layer rather than at all 29."""
    real = RealConfig()
    return ReproduceConfig(
        default=real.default, real=real, stage1=None, stage2=real_stage2(), seeds=1,
        methods=("FREE", "DeeBLIP", "PABEE-BLIP", "LeeBLIP", "MuE"), ablations=("no-adversarial",),
        dev_images=40, test_images=300, speed_images=4, eval_batch_size=16, noise_sigmas=(0.0,),
        per_layer=True, per_layer_layers=(5, 10, 15, 20, 25), unsupervised=False, plan=False)
