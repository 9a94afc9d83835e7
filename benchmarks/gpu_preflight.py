"""Preflight of every decode mode on a GPU: static (CUDA graphs) vs eager equality, host syncs per token, `.to()`.

Tiny random models of four families (OPT and Llama decoders, a T5 encoder-decoder, SmolVLM's tiled images), in
float32 and bfloat16, with exits at layers 2 and 4 of 6. Exits fire by a rule on the row's own hidden state
(`SignRule`: random models never pass a confidence threshold), so every run mixes exit layers. For each mode:

- `full`, and `early exit` under each skip policy (propagate from h_i or from the exit, copy, catch-up), with gated
  checks and with a head subset: the default path on this device (CUDA graphs where the engine captures them) is
  compared token for token with the eager one (`static=False`), and with transformers `generate` at full depth;
- `speculative` (drafted by the exit at layer 2, 3 drafts): its tokens vs full depth's (lossless in exact
  arithmetic; in bfloat16 a verification block of m tokens and m single-token steps may round differently);
- host syncs: `torch.cuda.set_sync_debug_mode("warn")` warns at each synchronising call; the warnings of a whole
  `generate` are counted and divided by the tokens it emitted (prefill included, so a slight over-count);
- `.to()`: generate in float32, convert the model and exits with `.to(torch.bfloat16)`, generate again: it must run,
  and give a fresh bfloat16 copy's tokens.

Every case runs in its own try/except, so one failure is reported and the rest still run. The JSON goes to stdout and
to $OUT/gpu_preflight.json when $OUT is set. On CPU (`--device cpu`) the same checks run, minus the capture and the
sync counts: a smoke run of the script.

    PYTHONPATH=src:. python benchmarks/gpu_preflight.py
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
from tests.conftest import tiny_batch
from tests.generation.regression_cases import SignRule

from freevlm.backbones.tiny import TinySize, build_tiny
from freevlm.exits import ExitSpec, build_exits
from freevlm.generation.criteria import Gated
from freevlm.generation.decode import generate_from_inputs
from freevlm.generation.kv import SkipPolicy
from freevlm.generation.speculative import DraftSettings
from freevlm.generation.vocab import HeadSubset
from freevlm.planning.gates import ExitGates

SIZE = TinySize(lm_layers=6, max_positions=256)
EXITS = [2, 4]
FAMILIES = ["blip2-opt", "llava-llama", "blip2-t5", "smolvlm-llama"]
POLICIES = [("propagate", "hidden"), ("propagate", "exit"), ("copy", "hidden"), ("catch_up", "hidden")]


def build(family: str, device: str, dtype: torch.dtype):
    torch.manual_seed(0)
    bb = build_tiny(family, SIZE, seed=0)
    torch.manual_seed(1)
    exits = build_exits(bb.lm, ExitSpec("transformer", EXITS))
    bb.model.to(device=device, dtype=dtype).eval()
    exits.to(device=device, dtype=dtype).eval()
    return bb, exits


def inputs(bb, family: str, batch: int, device: str, dtype: torch.dtype):
    pixels, ids, mask, extra = tiny_batch(family, SIZE, batch, seed=3)
    extra = {k: v.to(device) for k, v in extra.items()}
    with torch.no_grad():
        return (bb.prepare(pixels.to(device, dtype), ids.to(device), mask.to(device), **extra),
                (pixels, ids, mask, extra))


def modes(bb, exits, device):
    """name -> keyword arguments of `generate_from_inputs` (a fresh criterion per call: some keep state)."""
    torch.manual_seed(2)
    gates = ExitGates(EXITS, bb.lm.hidden_size, 0).to(device=device, dtype=next(exits.parameters()).dtype)
    subset = HeadSubset(torch.arange(SIZE.vocab_size // 2), SIZE.vocab_size)
    out = {"full": lambda: {}}
    for pol, src in POLICIES:
        out[f"early exit {pol}/{src}"] = lambda p=pol, s=src: dict(criterion=SignRule(), policy=SkipPolicy(p, s))
    out["gated propagate"] = lambda: dict(criterion=Gated(SignRule(), gates, 0.5))
    out["head subset propagate"] = lambda: dict(criterion=SignRule(), head_subset=subset)
    out["speculative e=2 L=3"] = lambda: dict(draft=DraftSettings(2, 3))
    return out


def count_syncs(device: str, fn):
    """(result, host syncs) of fn(); syncs are counted on CUDA only (None elsewhere)."""
    if not device.startswith("cuda"):
        return fn(), None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return result, sum("synchroniz" in str(w.message) for w in caught)


def run_family(family: str, device: str, dtype: torch.dtype, batch: int, new: int) -> dict:
    bb, exits = build(family, device, dtype)
    lm_inputs, (pixels, ids, mask, extra) = inputs(bb, family, batch, device, dtype)
    gen = bb.model.generation_config
    report: dict = {}

    def call(kwargs, static):
        with torch.no_grad():
            return generate_from_inputs(bb.lm, exits, lm_inputs, static=static, generation_config=gen,
                                        max_new_tokens=new, eos_token_id=[], **kwargs)

    full = call({}, False).sequences.tolist()
    try:  # transformers' greedy generate at full depth, EOS as the model's config has it, on both sides
        with torch.no_grad():
            hf = bb.hf_generate(pixels.to(device, dtype), ids.to(device), mask.to(device), max_new_tokens=new,
                                do_sample=False, num_beams=1, **extra)
            ours = generate_from_inputs(bb.lm, None, lm_inputs, generation_config=gen, max_new_tokens=new)
        hf = hf[:, 1:] if bb.lm.is_encoder_decoder else hf[:, ids.shape[1]:]
        report["hf generate == full eager"] = [r[:len(t)] for r, t in zip(hf.tolist(), ours.exit_layers)] == [
            r[:len(t)] for r, t in zip(ours.sequences.tolist(), ours.exit_layers)]
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        report["hf generate == full eager"] = f"error: {type(exc).__name__}: {exc}"
    for name, make in modes(bb, exits, device).items():
        entry: dict = {}
        try:
            eager = call(make(), False)
            default, syncs = count_syncs(device, lambda m=make: call(m(), None))
            entry["graphed"] = default.work.graphed
            entry["default == eager"] = default.sequences.tolist() == eager.sequences.tolist()
            if not name.startswith("speculative"):
                entry["exit layers equal"] = default.exit_layers == eager.exit_layers
                layers = [x for row in eager.exit_layers for x in row]
                entry["mean exit layer"] = sum(layers) / len(layers)
            entry["== full depth"] = default.sequences.tolist() == full
            emitted = sum(len(r) for r in default.exit_layers) / batch  # tokens per row (rows step together)
            entry["host syncs"] = syncs
            entry["host syncs per token"] = None if syncs is None else syncs / emitted
        except Exception as exc:  # noqa: BLE001 - one failing mode is reported; the rest still run
            entry["error"] = f"{type(exc).__name__}: {exc}"
            entry["traceback"] = traceback.format_exc(limit=6)
        report[name] = entry
    return report


def to_case(family: str, device: str, batch: int, new: int) -> dict:
    """Generate in float32, `.to(bfloat16)`, generate: it must run and equal a fresh bfloat16 copy."""
    try:
        bb, exits = build(family, device, torch.float32)
        fresh_bb, fresh_exits = copy.deepcopy(bb), copy.deepcopy(exits)
        fresh_bb.model.to(torch.bfloat16)
        fresh_exits.to(torch.bfloat16)
        lm_inputs, _ = inputs(bb, family, batch, device, torch.float32)
        gen = bb.model.generation_config
        kw = dict(policy=SkipPolicy("propagate", "hidden"), generation_config=gen, max_new_tokens=new,
                  eos_token_id=[])
        with torch.no_grad():
            generate_from_inputs(bb.lm, exits, lm_inputs, criterion=SignRule(), **kw)
            bb.model.to(torch.bfloat16)
            exits.to(torch.bfloat16)
            lm16, _ = inputs(bb, family, batch, device, torch.bfloat16)
            after = generate_from_inputs(bb.lm, exits, lm16, criterion=SignRule(), **kw)
            ref = generate_from_inputs(fresh_bb.lm, fresh_exits, lm16, criterion=SignRule(), **kw)
        return {"ran": True, "== fresh bf16": after.sequences.tolist() == ref.sequences.tolist()}
    except Exception as exc:  # noqa: BLE001
        return {"ran": False, "error": f"{type(exc).__name__}: {exc}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=12)
    parser.add_argument("--families", nargs="+", default=FAMILIES)
    args = parser.parse_args()
    start = time.perf_counter()
    results: dict = {"device": args.device, "torch": torch.__version__,
                     "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None, "runs": {}}
    for family in args.families:
        for dtype in (torch.float32, torch.bfloat16):
            key = f"{family} {str(dtype).removeprefix('torch.')}"
            try:
                results["runs"][key] = run_family(family, args.device, dtype, args.batch, args.tokens)
            except Exception as exc:  # noqa: BLE001
                results["runs"][key] = {"error": f"{type(exc).__name__}: {exc}",
                                        "traceback": traceback.format_exc(limit=6)}
            print(f"{key}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        results["runs"][f"{family} .to(bfloat16)"] = to_case(family, args.device, args.batch, args.tokens)
    results["seconds"] = time.perf_counter() - start
    for key, run in results["runs"].items():  # a one-screen summary on stderr
        bad = [m for m, e in run.items() if (isinstance(e, dict) and (
            "error" in e or e.get("default == eager") is False)) or e is False or m == "error"]
        print(f"{key}: {'ok' if not bad else 'CHECK ' + ', '.join(bad)}", file=sys.stderr)
    text = json.dumps(results, indent=2, default=str)
    print(text)
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "gpu_preflight.json").write_text(text)


if __name__ == "__main__":
    main()
