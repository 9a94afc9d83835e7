"""`freevlm train-backbone` (stage 1) and `freevlm train-exits` (stage 2): training on the labelled part of a split."""

from __future__ import annotations

from pathlib import Path

from freevlm import validate as check
from freevlm.commands.common import (
    check_inputs,
)
from freevlm.data.datasets import load_dataset
from freevlm.data.splits import split_by_image, split_record
from freevlm.errors import FreeVLMError
from freevlm.outputs import claim_output, write_json
from freevlm.train.batches import caption_examples, vqa_examples
from freevlm.train.loop import LoopConfig, OptimConfig


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


def train_backbone(
    backbone: Path, out: Path, dataset: str = "synthetic", data: Path | None = None, images: Path | None = None,
    questions: Path | None = None, split: str = "val", parts: list[str] | None = None, epochs: int = 10,
    batch_size: int = 16, lr: float = 1e-5, optimizer: str = "adam", decay_every: int = 3,
    train_fraction: float = 0.8, seed: int = 0, resume: bool = False, progress: bool = True,
) -> None:
    """Stage 1: fine-tune a backbone with cross-entropy on the labelled training part of a split (§3.2).

    backbone: transformers checkpoint folder (a supported family, see README); it is not modified
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
    check_inputs(backbone)
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
    check_inputs(backbone)
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
