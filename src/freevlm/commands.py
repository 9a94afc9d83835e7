"""The functions behind the `freevlm` commands. Each takes plain typed arguments and works from Python as well.

Dataset arguments are shared: `dataset` names a format (see `freevlm.data.datasets`), `data` / `images` /
`questions` point at its files, `split` picks the split.
"""

from __future__ import annotations

import json
from pathlib import Path

from freevlm.data.datasets import load_dataset
from freevlm.data.splits import split_by_image, split_record
from freevlm.errors import FreeVLMError
from freevlm.eval.efficiency import CostModel, compute_speedup, parameter_speedup
from freevlm.eval.evaluate import PAPER_THRESHOLDS, evaluate_captions, evaluate_visdial, evaluate_vqa
from freevlm.eval.report import markdown_table
from freevlm.generation.api import DecodeOptions, EarlyExitVLM
from freevlm.train.batches import CAPTION_PROMPT, caption_examples, vqa_examples
from freevlm.train.loop import LoopConfig, OptimConfig


def demo(out: Path = Path("runs/demo"), seed: int = 0, progress: bool = True) -> None:
    """Run the whole method on the embedded default: pretrain, fine-tune, train FREE exits, evaluate, time.

    out: folder for data, checkpoints and the report (reruns reuse what is there)
    seed: seed of the data split and of every training run
    progress: show progress bars
    """
    from freevlm.demo import demo as run

    run(out, seed=seed, progress=progress)


def make_data(out: Path, seed: int = 0) -> None:
    """Write the synthetic dataset (images, COCO/VQAv2/NoCaps/VisDial-format JSON) to a folder.

    out: target folder (reused if it holds the same dataset; refused if it holds anything else)
    seed: dataset seed
    """
    from freevlm.data.synthetic import SyntheticConfig, write_synthetic

    paths = write_synthetic(SyntheticConfig(seed=seed), out)
    print(f"synthetic dataset in {paths.root}")


def pretrain(out: Path = Path("runs/default"), seed: int = 0, progress: bool = True) -> None:
    """Build and pretrain the embedded default VLM (tiny BLIP-2, OPT LM) and its tiny CLIP on the synthetic train split.

    out: folder for the data and the pretrained backbone (out/pretrain-s<seed>/backbone)
    seed: model and data-order seed
    progress: show progress bars
    """
    from freevlm.default import DefaultConfig, default_clip_path, describe_default, pretrained_default

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
    return task, train, split_record(train, dev, seed, train_fraction)


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
    from freevlm.train.stage1 import Stage1Config
    from freevlm.train.stage1 import train_backbone as run

    bb = load_backbone(backbone)
    task, train, record = _load_train_split(dataset, data, images, questions, split, train_fraction, seed)
    cfg = Stage1Config(
        train_parts=tuple(parts or ("vision", "qformer", "projection")),
        optim=OptimConfig(name=optimizer, lr=lr, decay_every_epochs=decay_every),
        loop=LoopConfig(epochs=epochs, batch_size=batch_size, seed=seed, progress=progress),
    )
    means = run(bb, _examples(task, train), cfg, out, resume=resume)
    (Path(out) / "split.json").write_text(json.dumps(record, indent=2))
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
    from freevlm.rankers import load_ranker
    from freevlm.train.pseudo import capfilt_targets, greedy_targets
    from freevlm.train.stage2 import VARIANTS, variant_config
    from freevlm.train.stage2 import train_exits as run

    cfg = variant_config(variant, exit_layers=exit_layers, seed_layer=seed_layer, kl_direction=kl_direction,
                         optim=OptimConfig(name="adamw", lr=lr, warmup_steps=warmup_steps))
    rank = load_ranker(ranker, seed=seed) if VARIANTS[variant][3] == "capfilt" else None  # bad folders fail first
    bb = load_backbone(backbone)
    task, train, record = _load_train_split(dataset, data, images, questions, split, train_fraction, seed)
    examples = _examples(task, train)
    cfg.loop.batch_size, cfg.loop.seed, cfg.loop.progress = batch_size, seed, progress
    if epochs is not None:
        cfg.loop.epochs = epochs
    if adversarial_weight is not None:
        cfg.adversarial_weight = adversarial_weight
    targets = VARIANTS[variant][3]
    if targets == "greedy":
        examples = greedy_targets(bb, _unique_images(examples), progress=progress)
    elif targets == "capfilt":
        examples, _ = capfilt_targets(bb, _unique_images(examples), num_candidates=candidates, keep=keep,
                                      ranker=rank, seed=seed, progress=progress)
    _, means = run(bb, examples, cfg, out, resume=resume)
    (Path(out) / "split.json").write_text(json.dumps(record, indent=2))
    print(f"exit training done: {means}; exits: {Path(out) / 'exits'}")


def _unique_images(examples):
    """Unsupervised variants see each image (prompt) once, without its label."""
    seen, out = set(), []
    for e in examples:
        if (e.key, e.prompt) not in seen:
            seen.add((e.key, e.prompt))
            out.append(e)
    return out


def _options(criterion, threshold, kv_policy, num_beams, max_new_tokens, use_exits=True) -> DecodeOptions:
    return DecodeOptions(criterion=criterion, threshold=threshold, kv_policy=kv_policy, num_beams=num_beams,
                         max_new_tokens=max_new_tokens, use_exits=use_exits)


def generate(
    backbone: Path, image: list[Path], prompt: str = CAPTION_PROMPT, exits: Path | None = None,
    criterion: str = "confidence", threshold: float = 0.8, kv_policy: str = "propagate", num_beams: int = 1,
    max_new_tokens: int = 30, compare: bool = True,
) -> None:
    """Caption / answer images with early exits; print each token's exit layer and the speedups.

    backbone: transformers checkpoint folder
    image: one or more image files
    prompt: the text prompt (captioning: 'a photo of'; VQA: 'Question: ... Answer:')
    exits: exit checkpoint folder (from train-exits); without it, full-depth decoding
    criterion: confidence | entropy | patience | similarity
    threshold: the criterion's setting (confidence: alpha in (0, 1]; 1 never exits)
    kv_policy: what skipped layers' caches get: propagate | copy | catch_up
    num_beams: beam width (Table 10: 5)
    max_new_tokens: generation length limit
    compare: also decode at full depth and with transformers' generate, and print tokens/s side by side
    """
    from freevlm.eval.efficiency import measure_throughput

    vlm = EarlyExitVLM.from_pretrained(backbone, exits)
    opts = _options(criterion, threshold, kv_policy, num_beams, max_new_tokens, use_exits=exits is not None)
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
    if compare:
        ids = dict(image=list(image), prompts=[prompt] * len(image))

        def run(use):
            return lambda: sum(len(t) for t in vlm.generate(ids["image"], ids["prompts"], opts, use_exits=use).trace)

        runs = {"early_exit": [run(exits is not None)], "full_depth": [run(False)]}
        timing = measure_throughput(runs, repeats=3)
        print(markdown_table(["path", "tokens/s"], [[k, v["tokens_per_second"]] for k, v in timing.items()]))


def evaluate(
    backbone: Path, out: Path, exits: Path | None = None, dataset: str = "synthetic", data: Path | None = None,
    images: Path | None = None, questions: Path | None = None, split: str = "test", domain: str | None = None,
    criterion: str = "confidence", threshold: float = 0.8, kv_policy: str = "propagate", num_beams: int = 1,
    max_new_tokens: int = 30, batch_size: int = 16, official: bool = True, noise: float = 0.0,
    limit: int | None = None, progress: bool = True,
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
    criterion: confidence | entropy | patience | similarity
    threshold: the criterion's setting
    kv_policy: propagate | copy | catch_up
    num_beams: beam width
    max_new_tokens: generation length limit
    batch_size: images per generate call (per process); VisDial: candidate answers scored per forward pass
    official: caption metrics through pycocoevalcap with Java (else in-process BLEU-4 and CIDEr only)
    noise: std of Gaussian noise added to the normalised pixel values (Table 6)
    limit: evaluate only the first N samples
    progress: show progress bars
    """
    vlm = EarlyExitVLM.from_pretrained(backbone, exits)
    task, samples = load_dataset(dataset, split, data, images, questions, domain)
    samples = samples[:limit] if limit else samples
    opts = _options(criterion, threshold, kv_policy, num_beams, max_new_tokens, use_exits=exits is not None)
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
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result.to_json(), indent=2))
        print(json.dumps({"metrics": result.metrics, "speed": result.speed,
                          "exit_fractions": result.exit_fractions}, indent=2))


def sweep(
    backbone: Path, exits: Path, out: Path, dataset: str = "synthetic", data: Path | None = None,
    images: Path | None = None, questions: Path | None = None, split: str = "val",
    thresholds: list[float] | None = None, criterion: str = "confidence", kv_policy: str = "propagate",
    max_new_tokens: int = 30, batch_size: int = 16, limit: int | None = None, progress: bool = True,
) -> None:
    """Quality and speedups per threshold (default alpha in {0.5, ..., 1.0}): sweep.json and sweep.png in `out`.

    backbone: transformers checkpoint folder
    exits: exit checkpoint folder
    out: output folder
    dataset: dataset format
    data: dataset root (synthetic) or annotation file
    images: image folder (real datasets)
    questions: questions file
    split: split to sweep on (the development split, to choose alpha)
    thresholds: criterion settings to try
    criterion: confidence | entropy | patience | similarity
    kv_policy: propagate | copy | catch_up
    max_new_tokens: generation length limit
    batch_size: images per generate call
    limit: use only the first N samples
    progress: show progress bars
    """
    from freevlm.eval.plots import plot_sweep

    vlm = EarlyExitVLM.from_pretrained(backbone, exits)
    task, samples = load_dataset(dataset, split, data, images, questions)
    samples = samples[:limit] if limit else samples
    rows = {}
    for t in thresholds or list(PAPER_THRESHOLDS):
        opts = _options(criterion, t, kv_policy, 1, max_new_tokens)
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
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "sweep.json").write_text(json.dumps({str(k): v for k, v in rows.items()}, indent=2))
    plot_sweep({f"{criterion}": rows}, Path(out) / "sweep.png")
    print(f"wrote {Path(out) / 'sweep.json'} and {Path(out) / 'sweep.png'}")


def reproduce(out: Path = Path("runs/reproduce"), quick: bool = False, full: bool = False, seeds: int = 3,
              methods: list[str] | None = None, progress: bool = True) -> None:
    """Reproduce the paper's tables and figures on the embedded default; write a Markdown + PNG report folder.

    out: report and run folder
    quick: a few-minute version (1 seed, smaller evaluation sets), as CI runs it
    full: also the other backbones and the full sweeps
    seeds: seeds per experiment (spread is reported as mean ± std)
    methods: methods compared with FREE (default: DeeBLIP PABEE-BLIP LeeBLIP LeeBERT MuE; --quick: DeeBLIP MuE)
    progress: show progress bars
    """
    from freevlm.reproduce import reproduce as run

    run(out, quick=quick, full=full, seeds=seeds, progress=progress, methods=methods)

