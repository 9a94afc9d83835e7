"""Early-exit decoding speed on the embedded default, measured side by side in one run (results: BENCHMARKS.md).

For each confidence threshold: quality (in-process CIDEr on the test split), the paper's parameter speedup, the
compute speedup (exit checks and cache filling paid for), and wall-clock tokens/s of early-exit decoding vs
full-depth decoding through the same engine vs transformers' generate. Then a profile of where the time goes, and the
same measurements for a sparser exit placement.

    python benchmarks/decode_speed.py --out runs/demo          # reuses `make demo`'s checkpoints if present
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from freevlm.data.splits import split_by_image
from freevlm.data.synthetic import load_synthetic_captions
from freevlm.default import DefaultConfig, pretrained_default
from freevlm.demo import demo_stage1, demo_stage2, system_info
from freevlm.eval.evaluate import PAPER_THRESHOLDS, evaluate_captions, speed_comparison
from freevlm.eval.report import markdown_table
from freevlm.generation.api import DecodeOptions, EarlyExitVLM
from freevlm.train.batches import CAPTION_PROMPT, Example, caption_examples
from freevlm.train.stage1 import train_backbone
from freevlm.train.stage2 import train_exits


class Profiler:
    """Wall time spent inside module calls, by category, via forward pre/post hooks (no change to the engine)."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self.handles = []

    def watch(self, modules, category):
        for m in modules:
            starts = []
            self.handles.append(m.register_forward_pre_hook(lambda mod, args, s=starts: s.append(time.perf_counter())))
            self.handles.append(m.register_forward_hook(
                lambda mod, args, out, s=starts, c=category: self.seconds.__setitem__(
                    c, self.seconds[c] + time.perf_counter() - s.pop())))

    def close(self):
        for h in self.handles:
            h.remove()


def profile(vlm, examples, options) -> dict:
    lm = vlm.backbone.lm
    prof = Profiler()
    prof.watch(list(lm.layers), "backbone layers")
    if vlm.exits is not None and options.uses_exits:
        prof.watch([e.layer for e in vlm.exits.exits], "exit transformers")
    prof.watch([lm.lm_head], "LM head")
    prof.watch([m for m in (lm.norm,) if m is not None], "final norm")
    prof.watch([layer.self_attn.k_proj for layer in lm.layers] + [layer.self_attn.v_proj for layer in lm.layers],
               "(K/V projections, inside layers or propagation)")
    prof.watch([vlm.backbone.model.vision_model, vlm.backbone.model.qformer], "vision + Q-Former")
    start = time.perf_counter()
    with torch.no_grad():
        for e in examples:
            vlm.generate([e.image_path], [e.prompt], options)
    total = time.perf_counter() - start
    prof.close()
    out = dict(prof.seconds)
    inside = sum(v for k, v in out.items() if not k.startswith("("))
    out["everything else (Python, generate loop, masks, cache bookkeeping)"] = total - inside
    out["total"] = total
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="the demo's run folder (checkpoints are reused)")
    parser.add_argument("--speed-images", type=int, default=16, help="images timed at batch 1")
    parser.add_argument("--quality-images", type=int, default=300, help="test images scored per threshold")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    data_root, backbone = pretrained_default(out, DefaultConfig(), seed=0, progress=False)
    train, _ = split_by_image(load_synthetic_captions(data_root, "val"), 0)
    s1 = demo_stage1()
    s1.loop.progress = False
    train_backbone(backbone, caption_examples(train), s1, out / "stage1-s0", resume=True)
    s2 = demo_stage2()
    s2.loop.progress = False
    exits, _ = train_exits(backbone, caption_examples(train), s2, out / "free-s0", resume=True)
    sparse_cfg = demo_stage2(exit_layers=[3, 6, 9])
    sparse_cfg.loop.progress = False
    sparse, _ = train_exits(backbone, caption_examples(train), sparse_cfg, out / "free-sparse-s0", resume=True)
    test = load_synthetic_captions(data_root, "test")
    timed = [Example(s.image_id, s.image_path, CAPTION_PROMPT, None) for s in test[: args.speed_images]]
    results = {"machine": system_info()}
    print(f"machine: {results['machine']}")
    for name, ex in (("paper placement " + str(exits.layers), exits), ("sparse placement [3, 6, 9]", sparse)):
        vlm = EarlyExitVLM(backbone, ex)
        rows = []
        for alpha in PAPER_THRESHOLDS:
            opts = DecodeOptions(threshold=alpha)
            q = evaluate_captions(vlm, test[: args.quality_images], opts, official=False, progress=False)
            wall = speed_comparison(vlm, timed, opts, repeats=args.repeats, batch_size=1)
            rows.append([alpha, 100 * q.metrics["CIDEr"], q.speed["parameter_speedup"], q.speed["compute_speedup"],
                         wall["early_exit"]["tokens_per_second"], wall["full_depth"]["tokens_per_second"],
                         wall["hf_generate"]["tokens_per_second"], wall["ratios"]["early_exit_vs_full_depth"],
                         wall["ratios"]["early_exit_vs_hf_generate"]])
        headers = ["alpha", "CIDEr", "param x", "compute x", "EE tok/s", "full tok/s", "HF tok/s", "EE/full",
                   "EE/HF"]
        print(f"\n## {name}, batch 1\n")
        print(markdown_table(headers, rows))
        results[name] = {"headers": headers, "rows": rows}
        batch8 = speed_comparison(vlm, timed, DecodeOptions(threshold=0.8), repeats=args.repeats, batch_size=8)
        print(f"\nbatch 8, alpha 0.8: EE/full {batch8['ratios']['early_exit_vs_full_depth']:.2f}x, "
              f"EE/HF {batch8['ratios']['early_exit_vs_hf_generate']:.2f}x")
        results[name]["batch8_alpha0.8"] = batch8["ratios"]
        for label, opts in (("early exit, alpha 0.8", DecodeOptions(threshold=0.8)),
                            ("full depth", DecodeOptions(mode="full"))):
            prof = profile(vlm, timed, opts)
            print(f"\nprofile ({name}, {label}, batch 1, {len(timed)} images):")
            print(markdown_table(["where", "seconds", "share"],
                                 [[k, v, v / prof["total"]] for k, v in prof.items() if k != "total"]))
            results[name][f"profile {label}"] = prof
    Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
    Path("benchmarks/results/decode_speed.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
