"""Wall-clock of early exit at BLIP-2 OPT-2.7B size: what leaving at a given layer buys, and what exit checks cost.

No pretrained weights can be downloaded here, so the model is BLIP-2 with OPT-2.7B's LM shape (32 layers, hidden
2560, FFN 10240, vocabulary 50272) and a ViT-g-sized vision side, with random weights (timing does not depend on the
values). Random weights never make a confident exit, so instead of a criterion each row *forces* the decision:

- "exit at layer k": a single exit at layer k with threshold ~0, so every generated token leaves there: the speed
  ceiling of an exit at that depth, for each exit kind (frozen head = MuE, linear head = DeeBLIP, exit transformer =
  FREE, which runs one extra layer before the head);
- "checks only": the paper's 7 exits with threshold 1, so no token ever leaves: the pure cost of checking every exit.

Each row is timed side by side with full-depth decoding through the same engine (tokens/s, median of `--repeats`
after a warm-up), and once against transformers' own `generate`. Results: BENCHMARKS.md.

    python benchmarks/exit_depth_speed.py                  # on a GPU (bf16)
    python benchmarks/exit_depth_speed.py --tiny           # a few-second smoke run of the script itself on CPU
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import Blip2Processor, BlipImageProcessorPil

from freevlm.backbones.tiny import TinySize, build_tiny
from freevlm.data.synthetic import SyntheticConfig
from freevlm.default import default_tokenizer
from freevlm.demo import system_info
from freevlm.eval.evaluate import speed_comparison
from freevlm.eval.report import markdown_table
from freevlm.exits import ExitSpec, build_exits
from freevlm.generation.api import DecodeOptions, EarlyExitVLM
from freevlm.train.batches import CAPTION_PROMPT, Example

OPT_2_7B = TinySize(vocab_size=50272, lm_layers=32, lm_hidden=2560, lm_heads=32, lm_ffn=10240, vision_hidden=1408,
                    vision_layers=39, qformer_layers=12, image_size=224, patch_size=14, num_query_tokens=32,
                    max_positions=2048)
TINY = TinySize(vocab_size=512, lm_layers=8, lm_hidden=64, lm_heads=4, lm_ffn=128, vision_hidden=32, vision_layers=1,
                qformer_layers=1, image_size=32, patch_size=8, num_query_tokens=4, max_positions=256)
PAPER_EXITS = [3, 6, 9, 12, 24, 27, 30]  # §4, OPT-2.7B


def build(size: TinySize, device: str, dtype: torch.dtype):
    tok = default_tokenizer(SyntheticConfig())
    processor = Blip2Processor(BlipImageProcessorPil(size={"height": size.image_size, "width": size.image_size}), tok,
                               num_query_tokens=size.num_query_tokens)
    with torch.device(device):
        backbone = build_tiny("blip2-opt", size, processor=processor, seed=0)
    backbone.model.to(dtype)
    return backbone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a small model on CPU, to check the script runs")
    parser.add_argument("--images", type=int, default=2, help="images timed per row")
    parser.add_argument("--tokens", type=int, default=30, help="new tokens per image")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--kinds", nargs="+", default=["frozen-head", "linear", "transformer"])
    parser.add_argument("--kv-policies", nargs="+", default=["propagate"], help="what skipped layers' caches get")
    parser.add_argument("--out", default="benchmarks/results/exit_depth_speed.json")
    args = parser.parse_args()
    gpu = torch.cuda.is_available() and not args.tiny
    size, device, dtype = (OPT_2_7B, "cuda", torch.bfloat16) if gpu else (TINY, "cpu", torch.float32)
    start = time.perf_counter()
    backbone = build(size, device, dtype)
    n = backbone.lm.num_layers
    paper = PAPER_EXITS if n == 32 else backbone.default_exit_layers()
    depths = [paper[1], paper[3], paper[4]] if n == 32 else [2, 4]
    print(f"machine: {system_info()}; model built in {time.perf_counter() - start:.0f} s; LM layers {n}, "
          f"{sum(p.numel() for p in backbone.model.parameters()) / 1e9:.2f}B parameters, {dtype}")
    rng = torch.Generator().manual_seed(0)
    folder = Path(tempfile.mkdtemp(prefix="freevlm-bench-"))
    images = []
    for i in range(max(args.batch_sizes) * args.images):
        pixels = (torch.rand(size.image_size, size.image_size, 3, generator=rng) * 255).byte().numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
        images.append(folder / f"{i}.png")
    never = DecodeOptions(threshold=1.0, max_new_tokens=args.tokens)
    rows_spec = []
    for policy in args.kv_policies:
        forced = DecodeOptions(threshold=1e-9, max_new_tokens=args.tokens, kv_policy=policy)
        suffix = "" if args.kv_policies == ["propagate"] else f", {policy}"
        rows_spec += [(f"exit at layer {k}, {kind}{suffix}", ExitSpec(kind, [k]), forced)
                      for k in depths for kind in args.kinds]
    rows_spec += [(f"checks only, {len(paper)} exits, {kind}", ExitSpec(kind, paper), never) for kind in args.kinds]
    results = {"machine": system_info(), "size": size.__dict__, "dtype": str(dtype), "tables": {}}
    for batch in args.batch_sizes:
        examples = [Example(str(i), img, CAPTION_PROMPT, None) for i, img in enumerate(images[: batch * args.images])]
        full = speed_comparison(EarlyExitVLM(backbone), examples, DecodeOptions(use_exits=False,
                                max_new_tokens=args.tokens), repeats=args.repeats, batch_size=batch)
        rows = [["full depth (this engine) vs transformers' generate", "-",
                 full["early_exit"]["tokens_per_second"], full["hf_generate"]["tokens_per_second"],
                 full["ratios"]["early_exit_vs_hf_generate"]]]
        for name, spec, opts in rows_spec:
            with torch.device(device):
                exits = build_exits(backbone.lm, spec)
            exits.to(dtype)
            w = speed_comparison(EarlyExitVLM(backbone, exits), examples, opts, repeats=args.repeats,
                                 batch_size=batch, hf_generate=False)
            rows.append([name, n if opts is never else spec.layers[0], w["early_exit"]["tokens_per_second"],
                         w["full_depth"]["tokens_per_second"], w["ratios"]["early_exit_vs_full_depth"]])
            del exits
        headers = ["row", "layers run", "tok/s", "reference tok/s", "ratio"]
        print(f"\n## batch {batch} ({args.images} batches of {batch} image(s), {args.tokens} new tokens)\n")
        print(markdown_table(headers, rows))
        results["tables"][f"batch {batch}"] = {"headers": headers, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
