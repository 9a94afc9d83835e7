"""Lossless speculative decoding on the real VLM with its distilled drafting exit: the full head vs frequency-ranked
head subsets for the drafts (FR-Spec's idea: verification keeps the full head, so the output stays full depth's).

Not part of the test suite. The model is `freevlm demo --real`'s (stages cached in --out, trained there when
missing, through the same code), its drafting exit `RealConfig.draft` (`real_draft_exits`) unless --draft-exits
names another folder. The token ranking comes from the training split's captions (as `freevlm plan` ranks). Every
path decodes the same --images test images at batch 1, interleaved image by image, median of --repeats after a
warm-up pass; tokens are compared with full depth's.

    HF_HUB_OFFLINE=1 python benchmarks/draft_heads.py [--out runs/real] [--images 16] [--subsets 512 2048]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from freevlm.eval.planning import train_token_ranking
from freevlm.eval.report import markdown_table
from freevlm.exits import load_exits
from freevlm.generation.api import DecodeOptions, EarlyExitVLM
from freevlm.machine import system_info
from freevlm.real import RealConfig, real_backbone, real_draft_exits, real_splits
from freevlm.train.batches import CAPTION_PROMPT


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/real")
    p.add_argument("--draft-exits", default=None, help="a drafting-exit folder (default: the demo's)")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--draft-length", type=int, default=8)
    p.add_argument("--thresholds", type=float, nargs="*", default=[0.5], help="adaptive drafting thresholds tried "
                   "besides none")
    p.add_argument("--subsets", type=int, nargs="*", default=[512, 2048])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cfg = RealConfig()
    out = Path(args.out)
    data_root, bb = real_backbone(out, cfg, args.seed, progress=True)
    train, _, test = real_splits(data_root, args.seed, cfg)
    if args.draft_exits is not None:
        draft = load_exits(args.draft_exits, bb.lm)
    else:
        draft = real_draft_exits(bb, out, train, cfg, args.seed)
    layer = draft.layers[0]
    vlm = EarlyExitVLM(bb, None, train_token_ranking(bb, "caption", train), draft_exits=draft)
    paths = {"full depth": DecodeOptions(mode="full")}
    for size in [None, *args.subsets]:
        for thr in [None, *args.thresholds]:
            name = f"speculative, head {'full' if size is None else size}" + ("" if thr is None else f", stop < {thr}")
            paths[name] = DecodeOptions(mode="speculative", draft_layer=layer, draft_length=args.draft_length,
                                        draft_threshold=thr, head_subset=size)
    images = [s.image_path for s in test[: args.images]]
    seconds = {k: [] for k in paths}
    tokens, stats = {}, {}
    with torch.no_grad():
        for rep in range(args.repeats + 1):  # the first pass warms up and records tokens
            for k in paths:
                seconds[k].append(0.0)
            for image in images:
                for k, opts in paths.items():
                    t0 = time.perf_counter()
                    res = vlm.generate([image], [CAPTION_PROMPT], opts, tokenizer_decode=False)
                    seconds[k][-1] += time.perf_counter() - t0
                    if rep == 0:
                        tokens.setdefault(k, []).append(res.sequences[0, : res.num_tokens].tolist())
                        if res.speculative is not None:
                            s = stats.setdefault(k, [0, 0, 0])
                            s[0], s[1], s[2] = (s[0] + res.speculative.accepted, s[1] + res.speculative.drafted,
                                                s[2] + res.speculative.rounds)
    full_s = statistics.median(seconds["full depth"][1:])
    n_tokens = sum(len(t) for t in tokens["full depth"])
    result = {"system": system_info(), "draft_layer": layer, "images": len(images), "tokens": n_tokens,
              "repeats": args.repeats, "paths": {}}
    rows = []
    for k in paths:
        med = statistics.median(seconds[k][1:])
        accepted, drafted, rounds = stats.get(k, (0, 0, 0))
        entry = {"seconds": seconds[k][1:], "median_seconds": med, "vs_full_depth": full_s / med,
                 "tokens_identical": tokens[k] == tokens["full depth"],
                 "acceptance_rate": accepted / drafted if drafted else None,
                 "drafts_per_round": drafted / rounds if rounds else None}
        result["paths"][k] = entry
        rows.append([k, n_tokens / med, entry["vs_full_depth"], "-" if not drafted else f"{accepted / drafted:.3f}",
                     "-" if not rounds else f"{drafted / rounds:.2f}", "yes" if entry["tokens_identical"] else "NO"])
    print(f"\n{len(images)} test images, batch 1, {torch.get_num_threads()} threads, median of {args.repeats} "
          f"({result['system']['cpu']}); drafting exit at layer {layer}, up to {args.draft_length} drafts\n")
    print(markdown_table(["path", "tokens/s", "vs full depth", "drafts kept", "drafts / round", "tokens = full"], rows))
    (out / "benchmark_draft_heads.json").write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
