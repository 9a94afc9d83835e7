"""One seed's trained models and the method loop: stage 1, then every compared method trained, tuned on dev and scored
on test (the rows every table reads), and the helpers the tables' measurements share.

The pretrained backbone is shared by the seeds, as a released checkpoint would be; each seed draws its own 80/20
split, stage-1 fine-tune, exit initialisation and data order. The tables (`tables/`) receive a `SeedRun` and import it
from here; `run.py` runs the seeds and, after each one's method loop, the tables' measurements.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from freevlm.backbones import load_backbone
from freevlm.baselines import METHODS
from freevlm.data.splits import split_by_image, split_record
from freevlm.data.synthetic import load_synthetic_captions, load_synthetic_vqa
from freevlm.default import default_clip_path
from freevlm.eval.bootstrap import per_image_cider
from freevlm.eval.efficiency import trainable_parameters_per_exit
from freevlm.eval.evaluate import evaluate_captions, evaluate_vqa, speed_comparison
from freevlm.exits import ExitSpec, ExitStack, build_exits
from freevlm.generation.api import DecodeOptions, EarlyExitVLM
from freevlm.rankers import CaptionRanker, load_ranker
from freevlm.reproduce.config import ReproduceConfig
from freevlm.train.batches import CAPTION_PROMPT, VQA_TEMPLATE, Example, caption_examples, vqa_examples
from freevlm.train.loop import LoopConfig
from freevlm.train.stage1 import train_backbone
from freevlm.train.stage2 import ExitTrainConfig, train_exits, train_exits_together, variant_config

PER_LAYER = "per-layer-linear"  # Fig. 3's linear head after every layer, trained in the method loop's linear pass
TINY_CLIP = "tiny-clip"  # ReproduceConfig.capfilt_ranker: the embedded default's own CLIP (from pretrained_default)


def prompt_examples(samples) -> list[Example]:
    """One unlabelled captioning example per sample."""
    return [Example(s.image_id, s.image_path, CAPTION_PROMPT, None) for s in samples]


def unique_keys(examples: list[Example]) -> list[Example]:
    """The first example of each key (an image, or a question): unsupervised variants see each one once."""
    seen, out = set(), []
    for e in examples:
        if e.key not in seen:
            seen.add(e.key)
            out.append(e)
    return out


@dataclass
class Task:
    """One dataset as the method loop needs it: its splits, how its examples are made and scored."""

    name: str  # "caption" | "vqa"
    train: list  # the 80% of the validation split
    dev: list  # (a subset of) the other 20%
    test: list
    metric: str  # the quality that chooses each method's setting: CIDEr | accuracy

    def examples(self, samples) -> list[Example]:
        return caption_examples(samples) if self.name == "caption" else vqa_examples(samples)

    def prompts(self, samples) -> list[Example]:
        if self.name == "caption":
            return prompt_examples(samples)
        return [Example(s.question_id, s.image_path, VQA_TEMPLATE.format(s.question), None) for s in samples]

    def evaluate(self, vlm, samples, opts, official: bool = False, progress: bool = False, **kw):
        """Decode and score `samples`; `kw` goes to the evaluator (batch_size, pixel_noise, ...)."""
        if self.name == "caption":
            return evaluate_captions(vlm, samples, opts, official=official, progress=progress, **kw)
        return evaluate_vqa(vlm, samples, replace(opts, max_new_tokens=5), progress=progress, **kw)

    def quality(self, result) -> float:
        return 100 * result.metrics[self.metric]


def make_task(name: str, data_root: Path, seed: int, dev_n: int, test_n: int) -> tuple[Task, dict]:
    load = load_synthetic_captions if name == "caption" else load_synthetic_vqa
    train, dev = split_by_image(load(data_root, "val"), seed)
    task = Task(name, train, dev[:dev_n], load(data_root, "test")[:test_n], "CIDEr" if name == "caption" else
                "accuracy")
    return task, split_record(train, dev, seed, 0.8)


def forced_exit(exits: ExitStack, layer: int) -> ExitStack:
    """The exit at `layer` alone: decoding with a negligible threshold then leaves every token there."""
    return ExitStack(ExitSpec(exits.spec.kind, [layer], exits.spec.seed_layer), [exits.at(layer)])


@dataclass
class SeedCore:
    """What the method loop leaves for the tables: the fine-tuned backbone, it at full depth, every trained exit set
    (the compared methods, the ablations and, with Fig. 3, the per-layer linear heads)."""

    backbone: object
    full: EarlyExitVLM
    trained: dict[str, ExitStack]


class SeedRun:
    """Everything one seed trains and measures on one backbone; results land in `self.results`.

    `root` is the reproduce folder (pretrained backbones of other families are cached there)."""

    def __init__(self, cfg: ReproduceConfig, seed: int, pretrained: Path, data_root: Path, out: Path,
                 progress: bool, task: str = "caption", root: Path | None = None):
        self.cfg, self.seed, self.out, self.progress = cfg, seed, out, progress
        self.pretrained, self.data_root = pretrained, data_root
        self.root = root if root is not None else out.parent
        self.task, split = make_task(task, data_root, seed, cfg.dev_images, cfg.test_images)
        self.train, self.dev, self.test = self.task.train, self.task.dev, self.task.test
        self.results: dict = {"split": split}

    def sub_run(self, name: str, task: str = "caption", pretrained: Path | None = None) -> SeedRun:
        """Another run of this seed in `out/name` (another task or backbone), sharing the configuration."""
        return SeedRun(self.cfg, self.seed, pretrained or self.pretrained, self.data_root, self.out / name,
                       self.progress, task=task, root=self.root)

    def ranker(self, spec: str | None = None) -> CaptionRanker:
        """A CapFilt ranker: `spec` (default: the configuration's), where "tiny-clip" is the default's own CLIP."""
        spec = spec or self.cfg.capfilt_ranker
        return load_ranker(default_clip_path(self.root, self.cfg.default) if spec == TINY_CLIP else spec, self.seed)

    def _loop(self, loop: LoopConfig) -> LoopConfig:
        return replace(loop, seed=self.seed, progress=self.progress)

    def finetuned(self):
        bb = load_backbone(self.pretrained)
        if self.cfg.stage1 is None:  # the real VLM: its stage 1 (the projection) made `pretrained`
            return bb
        s1 = replace(self.cfg.stage1, loop=self._loop(self.cfg.stage1.loop))
        train_backbone(bb, self.task.examples(self.train), s1, self.out / "stage1", resume=True)
        return bb

    def captions(self, vlm, samples, opts, **kw):
        """In-process caption metrics (BLEU-4, CIDEr) for the tables that score many cells."""
        return evaluate_captions(vlm, samples, opts, official=False, progress=self.progress,
                                 batch_size=self.cfg.eval_batch_size, **kw)

    def _exit_cfg(self, variant: str, exit_layers=None) -> ExitTrainConfig:
        base = self.cfg.stage2
        return variant_config(variant, exit_layers=exit_layers or base.exit_layers, seed_layer=base.seed_layer,
                              discriminator_hidden=base.discriminator_hidden, discriminator_lr=base.discriminator_lr,
                              optim=base.optim, loop=self._loop(base.loop),
                              cache_image_features=base.cache_image_features, head_precision=base.head_precision)

    def exits_for(self, bb, variant: str, examples, name: str, exit_layers=None):
        exits, _ = train_exits(bb, examples, self._exit_cfg(variant, exit_layers), self.out / name, resume=True)
        return exits

    def linear_sets(self, bb, names, examples, extra: dict | None = None) -> dict:
        """The linear-head methods' exits (and `extra`: name -> (variant, exit layers)), trained in one pass over the
        data: the same weights as training each alone, one shared backbone forward (`train_exits_together`)."""
        cfgs = {name: self._exit_cfg(METHODS[name].variant) for name in names}
        cfgs.update({name: self._exit_cfg(variant, layers) for name, (variant, layers) in (extra or {}).items()})
        if not cfgs:
            return {}
        return train_exits_together(bb, examples, cfgs, self.out / f"{self.task.name}-linear", resume=True)

    def choose(self, vlm, method, wall: bool = False) -> tuple[float, dict]:
        """The method's dev-split curve (setting -> quality and speedups; `wall`: the measured wall-clock ratio too)
        and the best setting (§4); ties go to the fastest setting (smallest alpha / similarity, largest patience has
        no speed advantage so smallest)."""
        curve = {}
        for setting in method.settings:
            opts = DecodeOptions(criterion=method.criterion, threshold=setting, kv_policy=method.kv_policy)
            r = self.task.evaluate(vlm, self.dev, opts, progress=self.progress, batch_size=self.cfg.eval_batch_size)
            curve[setting] = {"quality_metric": f"{self.task.metric} (dev)", "quality": self.task.quality(r),
                              **r.speed}
            if wall:
                curve[setting]["wall_clock_vs_full_depth"] = self.wall(vlm, self.dev, opts)
        best = max(v["quality"] for v in curve.values())
        return min(s for s, v in curve.items() if v["quality"] >= best), curve

    def test_row(self, vlm, opts, wall: bool = True, official: bool = True) -> dict:
        r = self.task.evaluate(vlm, self.test, opts, official=official, progress=self.progress,
                               batch_size=self.cfg.eval_batch_size)
        row = {"metrics": r.metrics, "speed": r.speed, "exit_fractions": {str(k): v for k, v in
                                                                          r.exit_fractions.items()}}
        if self.task.name == "caption":  # for paired-bootstrap intervals of differences (claims.py)
            row["per_image_cider"] = per_image_cider({p["key"]: p["prediction"] for p in r.predictions},
                                                     {s.image_id: s.captions for s in self.test})
        if wall:
            row["wall_clock_vs_full_depth"] = self.wall(vlm, self.test, opts)
        return row

    def wall(self, vlm, samples, opts, pixel_noise: float = 0.0) -> float:
        """Measured tokens/s of early-exit vs full-depth decoding (batch 1) on the first `speed_images` samples;
        transformers' `generate` is compared in the demo and BENCHMARKS.md."""
        w = speed_comparison(vlm, self.task.prompts(samples[: self.cfg.speed_images]), opts, repeats=3,
                             batch_size=1, hf_generate=False, pixel_noise=pixel_noise)
        return w["ratios"]["early_exit_vs_full_depth"]

    def method_options(self, name: str, results: dict | None = None) -> DecodeOptions:
        """Decoding options of a compared method at the setting the method loop chose for it on dev."""
        m = METHODS[name]
        chosen = (results or self.results)["methods"][name]["setting"]
        return DecodeOptions(criterion=m.criterion, threshold=chosen, kv_policy=m.kv_policy)

    def methods(self, bb, names, examples=None, free_variant: str = "semi", extra_linear: dict | None = None):
        """Train (or build) each method's exits, choose its setting on dev, score it on test. `extra_linear`: more
        linear exit sets to train alongside the linear-head baselines (returned in `trained`, not evaluated)."""
        res = {"methods": {}, "curves": {}}
        examples = examples if examples is not None else self.task.examples(self.train)
        linear = [n for n in names if n in METHODS and METHODS[n].exit_kind == "linear"]
        trained = self.linear_sets(bb, linear, examples, extra_linear)
        for name in names:
            method = METHODS.get(name) or replace(METHODS["FREE"], name=name, variant=name)
            if name == "FREE":
                method = replace(method, variant=free_variant)
            if name in trained:
                exits = trained[name]
            elif method.variant is None:
                layers = self.cfg.stage2.exit_layers or bb.default_exit_layers()
                exits = build_exits(bb.lm, ExitSpec(method.exit_kind, list(layers)))
            else:
                exits = self.exits_for(bb, method.variant, examples, f"{self.task.name}-{name}")
            trained[name] = exits
            vlm = EarlyExitVLM(bb, exits)
            chosen, curve = self.choose(vlm, method, wall=name == "FREE")  # FREE's quality-vs-alpha table
            opts = DecodeOptions(criterion=method.criterion, threshold=chosen, kv_policy=method.kv_policy)
            row = self.test_row(vlm, opts, official=self.task.name == "caption")
            row.update(setting=chosen, criterion=method.criterion,
                       trainable_per_exit=trainable_parameters_per_exit(exits))
            res["methods"][name], res["curves"][name] = row, curve
        return res, trained

    def method_loop(self) -> SeedCore:
        """Stage 1, then the method loop: Table 4's rows and every method's dev curve, in `self.results`; returns
        what the tables' measurements read (`run.run_seed` runs them next)."""
        cfg, res = self.cfg, self.results
        bb = self.finetuned()
        full_vlm = EarlyExitVLM(bb)
        res["backbone"] = self.test_row(full_vlm, DecodeOptions(mode="full"), wall=False)
        layers = per_layer_layers(cfg, bb.lm.num_layers)  # Fig. 3's vanilla early exit: a DeeBLIP head per layer
        found, trained = self.methods(bb, (*cfg.methods, *cfg.ablations),
                                      extra_linear={PER_LAYER: ("deebert", layers)} if cfg.per_layer else None)
        res.update(found)
        return SeedCore(bb, full_vlm, trained)

    def run_light(self) -> dict:
        """Stage 1, then FREE and the baselines: the other backbones' tables (5, 7, 8) and semi-supervised VQA (2)."""
        bb = self.finetuned()
        res = {"split": self.results["split"], "backbone": self.test_row(
            EarlyExitVLM(bb), DecodeOptions(mode="full"), wall=False, official=self.task.name == "caption")}
        res.update(self.methods(bb, self.cfg.methods)[0])
        return res


def per_layer_layers(cfg: ReproduceConfig, num_layers: int) -> list[int]:
    """Fig. 3's layers: the configured ones, or every layer below the last."""
    return list(cfg.per_layer_layers) if cfg.per_layer_layers else list(range(1, num_layers))
