"""What exit checks cost when no exit fires: ungated checks vs gated checks vs full depth (issue 20's overhead target).

On a trained run (the demo's: `runs/demo`, or the real VLM's: `runs/real`), every path decodes the same test images
at batch 1, interleaved, median of `--repeats` after a warm-up (`speed_comparison`):

- full depth;
- "checks, ungated": every exit checked (exit transformer + head + criterion) at alpha = 0.999999, so (nearly) no
  token leaves: the price of checking that the paper's speedup never charges;
- "checks, gated (closed)": the same exits behind gates that never open (gate threshold 1): each check is the gate's
  MLP on h_i plus the exit cache's K/V projection, and no exit transformer or head runs;
- with `--gates FOLDER` (from `freevlm plan`: `<plan>/gates/alpha-X`), also those trained gates at alpha 1 - 1e-6.

Output: tokens/s per path and the overhead vs full depth; JSON with `--out`. Results: BENCHMARKS.md.

    python benchmarks/gate_overhead.py --run runs/demo --images 16 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from freevlm.data.synthetic import load_synthetic_captions
from freevlm.eval.evaluate import speed_comparison
from freevlm.eval.report import markdown_table
from freevlm.generation.api import DecodeOptions, EarlyExitVLM
from freevlm.machine import system_info
from freevlm.planning.gates import ExitGates, exits_fingerprint, gate_hidden_size, save_gates
from freevlm.train.batches import CAPTION_PROMPT, Example


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo"), help="a demo run folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gates", type=Path, default=None, help="trained gates (a plan's gates/alpha-X folder)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backbone, exits = args.run / f"stage1-s{args.seed}" / "backbone", args.run / f"free-s{args.seed}" / "exits"
    if not backbone.is_dir():  # the real VLM's run (`make real`): its stages are named real-*
        backbone, exits = (args.run / f"real-stage1-s{args.seed}" / "backbone",
                           args.run / f"real-free-s{args.seed}" / "exits")
    if not (backbone.is_dir() and exits.is_dir()):
        raise SystemExit(f"error: {args.run} holds no trained demo run (run `make demo` or `make real` first)")
    vlm = EarlyExitVLM.from_pretrained(backbone, exits)
    lm = vlm.backbone.lm
    test = load_synthetic_captions(args.run / "data", "test")[: args.images]
    examples = [Example(s.image_id, s.image_path, CAPTION_PROMPT, None) for s in test]
    layer_params = sum(p.numel() for p in lm.layers[0].parameters())
    closed = Path(tempfile.mkdtemp()) / "closed-gates"
    gates = ExitGates(list(vlm.exits.layers), lm.hidden_size, gate_hidden_size(lm.hidden_size, layer_params))
    save_gates(closed, gates, {"alpha": 1.0, "exits_fingerprint": exits_fingerprint(vlm.exits)})
    alpha = 1 - 1e-6
    paths = {"checks, ungated": DecodeOptions(threshold=alpha),
             "checks, gated (closed)": DecodeOptions(threshold=alpha, gates=str(closed), gate_threshold=1.0)}
    if args.gates is not None:
        paths["checks, trained gates"] = DecodeOptions(threshold=alpha, gates=str(args.gates))
    with torch.no_grad():
        timing = speed_comparison(vlm, examples, DecodeOptions(mode="full"), repeats=args.repeats, also=paths)
    full = timing["full_depth"]["tokens_per_second"]
    rows = [[k, v["tokens_per_second"], v["tokens_per_second"] / full - 1]
            for k, v in timing.items() if k != "ratios"]
    print(f"exits {list(vlm.exits.layers)} of {lm.num_layers} layers; gate: {gates.parameters_per_gate():,} "
          f"parameters (a layer: {layer_params:,}); {len(examples)} images, median of {args.repeats}")
    print(markdown_table(["path", "tokens/s", "vs full depth - 1"], rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"timing": timing, "machine": system_info(), "exits": list(vlm.exits.layers),
                                        "gate_parameters": gates.parameters_per_gate(),
                                        "layer_parameters": layer_params}, indent=2, default=str))


if __name__ == "__main__":
    main()
