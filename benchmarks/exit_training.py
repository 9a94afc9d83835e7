"""Exits trained to agree, on the real VLM: per-exit agreement with the final layer and draft acceptance, before/after.

Not part of the test suite. The model is `freevlm demo --real`'s (stages cached in --out, trained there when missing,
through the same code). Three exit sets, each trained from the same seed on the same training split:

- `FREE (CE + adv)`: the demo's stage 2 (CE on the human captions + the adversarial term), its cached exits;
- `KD (+ adv)`: the same settings with the paper's KD task on the backbone's own greedy captions (generated once,
  full depth), KL(p_N || p_i) (`kl_direction="final_to_exit"`, the usual distillation direction, whose minimiser
  matches the final layer's distribution, i.e. agreement);
- `KD, draft exit only, 3x steps`: only the drafting exit (layer --draft-layer), trained three times as long: the
  demo's drafting exit (`RealConfig.draft`, `real_draft_exits`, cached in the same folder).

Measured on test images: teacher-forced agreement of each exit's argmax with the final layer's along the backbone's
own greedy captions (the positions decoding meets), and lossless speculative decoding drafted by --draft-layer
(greedy, batch 1, up to --draft-length drafts): share of drafts kept, tokens per verification, and tokens/s vs full
depth, paths interleaved image by image, median of --repeats.

    HF_HUB_OFFLINE=1 python benchmarks/exit_training.py [--out runs/real] [--images 100] [--speed-images 16]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from freevlm.eval.report import markdown_table
from freevlm.exits import load_exits
from freevlm.generation.api import DecodeOptions, EarlyExitVLM
from freevlm.losses import IGNORE
from freevlm.machine import system_info
from freevlm.outputs import write_json
from freevlm.real import RealConfig, real_backbone, real_draft, real_draft_exits, real_exits, real_splits
from freevlm.train.batches import CAPTION_PROMPT, Collator, Example, caption_examples
from freevlm.train.forward import teacher_forced
from freevlm.train.pseudo import greedy_targets
from freevlm.train.stage2 import train_exits


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/real")
    p.add_argument("--images", type=int, default=100, help="test images for agreement and acceptance")
    p.add_argument("--speed-images", type=int, default=16, help="test images timed")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--draft-layer", type=int, default=6)
    p.add_argument("--draft-length", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


@torch.no_grad()
def agreement(bb, exits, examples: list[Example], batch_size: int = 16) -> dict[int, float]:
    """Per exit: share of target positions where its argmax equals the final layer's (teacher-forced)."""
    hits = {layer: 0 for layer in exits.layers}
    total = 0
    for i in range(0, len(examples), batch_size):
        batch = Collator(bb)(examples[i : i + batch_size])
        tf = teacher_forced(bb, batch, keep=set(exits.layers), logits=True)
        final = tf.logits.argmax(-1)
        mask = tf.targets != IGNORE
        total += int(mask.sum())
        for layer, exit_ in zip(exits.layers, exits.exits):
            pred = exit_.logits(bb.lm, exit_.state(bb.lm, tf.states[layer], tf.ctx, None)).argmax(-1)
            hits[layer] += int(((pred == final) & mask).sum())
    return {layer: hits[layer] / total for layer in exits.layers}


def trained(bb, examples, cfg, folder: Path, progress: bool = True):
    """Exits trained under `cfg` in `folder`, or loaded when a finished run is there."""
    if (folder / "exits" / "exits.json").is_file() and (folder / "done").is_file():
        return load_exits(folder / "exits", bb.lm, list(cfg.exit_layers))
    exits, _ = train_exits(bb, examples, replace(cfg, loop=replace(cfg.loop, progress=progress)), folder)
    (folder / "done").write_text("ok\n")
    return exits


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    cfg = RealConfig()
    start = time.perf_counter()
    data_root, bb = real_backbone(out, cfg, args.seed, progress=True)
    train, _, test = real_splits(data_root, args.seed, cfg)
    test = test[: args.images]
    sets = {"FREE (CE + adv)": real_exits(bb, out, train, cfg, args.seed)}
    train_images = caption_examples(train, every_caption=False)  # one per image
    print(f"pseudo-labels: the backbone's greedy captions of {len(train_images)} training images", flush=True)
    kd_examples = greedy_targets(bb, train_images)
    kd = replace(cfg.stage2, task="kd", kl_direction="final_to_exit")
    sets["KD (+ adv)"] = trained(bb, kd_examples, kd, out / f"exits-kd-s{args.seed}")
    # the demo's drafting exit (`RealConfig.draft`): KD on the same greedy captions, one exit, 3x the steps
    sets[f"KD, exit {args.draft_layer} only, 3x steps"] = real_draft_exits(
        bb, out, train, replace(cfg, draft=real_draft(args.draft_layer)), args.seed)
    print(f"teacher-forced agreement on the greedy captions of {len(test)} test images", flush=True)
    test_examples = greedy_targets(bb, [Example(s.image_id, s.image_path, CAPTION_PROMPT, None) for s in test])
    results = {"system": system_info(), "images": len(test), "draft_layer": args.draft_layer,
               "draft_length": args.draft_length, "sets": {}}
    speed = [Example(s.image_id, s.image_path, CAPTION_PROMPT, None) for s in test[: args.speed_images]]
    spec = DecodeOptions(mode="speculative", draft_layer=args.draft_layer, draft_length=args.draft_length)
    timed: dict[str, list[float]] = {"full depth": []}
    tokens: dict[str, int] = {}
    vlms = {name: EarlyExitVLM(bb, exits) for name, exits in sets.items()}
    for name, exits in sets.items():
        entry = {"agreement": agreement(bb, exits, test_examples)}
        res = vlms[name].generate([s.image_path for s in test], [CAPTION_PROMPT] * len(test), spec,
                                  tokenizer_decode=False)
        entry["speculative"] = res.speculative.to_json(bb.lm.num_layers)
        results["sets"][name] = entry
        timed[name] = []
        print(name, entry, flush=True)
    full_vlm = next(iter(vlms.values()))
    for rep in range(args.repeats + 1):  # the first pass warms up; paths interleaved image by image
        for name in timed:
            timed[name].append(0.0)
        for ex in speed:
            for name in timed:
                vlm = full_vlm if name == "full depth" else vlms[name]
                opts = DecodeOptions(mode="full") if name == "full depth" else spec
                t0 = time.perf_counter()
                res = vlm.generate([ex.image_path], [ex.prompt], opts, tokenizer_decode=False)
                timed[name][-1] += time.perf_counter() - t0
                if rep == 0:
                    tokens[name] = tokens.get(name, 0) + res.num_tokens
    for name in timed:
        results.setdefault("speed", {})[name] = {"seconds": statistics.median(timed[name][1:]),
                                                 "tokens": tokens[name]}
    full_tps = tokens["full depth"] / results["speed"]["full depth"]["seconds"]
    rows = []
    layers = sorted({layer for s in results["sets"].values() for layer in s["agreement"]})
    for name, entry in results["sets"].items():
        tps = tokens[name] / results["speed"][name]["seconds"]
        sp = entry["speculative"]
        rows.append([name, *[f"{100 * entry['agreement'][k]:.1f}" if k in entry["agreement"] else "-"
                             for k in layers], f"{100 * sp['acceptance_rate']:.1f}",
                     sp["tokens_per_verification"], tps / full_tps])
    print(f"\n{len(test)} test images (agreement, acceptance); {len(speed)} timed, batch 1, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}:")
    print(markdown_table(["exits", *[f"agree @{k} %" for k in layers], f"drafts kept @{args.draft_layer} %",
                          "tokens/verification", "speculative vs full depth"], rows))
    results["seconds"] = time.perf_counter() - start
    write_json(out / "benchmark_exit_training.json", results, default=str)
    print(f"done in {results['seconds'] / 60:.1f} min: {out / 'benchmark_exit_training.json'}")
    return results


if __name__ == "__main__":
    main()
