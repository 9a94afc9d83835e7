"""The decode session on a GPU: what reusing its caches and CUDA graphs across generate calls saves, and continuous
batching (`RowBatch`: rows admitted and released between steps) checked against decoding each prompt alone.

At a real LM's shape with random bf16 weights (`gpu_decode.py`'s shapes), per decode path (full depth; early exit
with every token forced out at one exit; lossless speculative), each timed call generates `--tokens` tokens for one
prompt:
- `fresh`: `generate_from_inputs` without a session: each call allocates its cache and captures its CUDA graphs;
- `session`: the same calls through one `DecodeSession`: the first call captures, the next ones replay (its first
  call's time is reported apart).
Calls are interleaved fresh / session, median of `--repeats`; tokens are compared between the two.

Then continuous batching: prompts of different lengths admitted into a 2-row `RowBatch` as rows free up (full depth,
and early exit at one exit), each prompt's tokens compared with its decode alone.

    python benchmarks/gpu_session.py                      # on a GPU (about 1-2 minutes on an H200)
    python benchmarks/gpu_session.py --device cpu --tiny  # a smoke run on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from benchmarks.gpu_decode import SHAPES, build
from PIL import Image

from freevlm.generation.criteria import Confidence
from freevlm.generation.decode import generate_from_inputs
from freevlm.generation.session import DecodeSession
from freevlm.generation.speculative import DraftSettings
from freevlm.machine import system_info
from freevlm.train.batches import encode_prompts

PROMPTS = ["a photo of", "describe the picture in a few words please", "what is", "the image shows a"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default="smollm2", choices=sorted(SHAPES))
    parser.add_argument("--tiny", action="store_true", help="--shape tiny: a smoke run")
    parser.add_argument("--tokens", type=int, default=16, help="new tokens per call (a short answer)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default=None, help="bfloat16 (default on CUDA) / float32 (default on CPU)")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit("gpu_session: no CUDA device here; pass --device cpu --tiny for a smoke run")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    shape = "tiny" if args.tiny else args.shape
    family, size, exit_layers, spec = SHAPES[shape]
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    backbone, exits = build(family, size, exit_layers, args.device, dtype)
    lm, config = backbone.lm, backbone.model.generation_config
    image = Image.fromarray((torch.rand(size.image_size, size.image_size, 3, generator=torch.Generator().manual_seed(0))
                             * 255).byte().numpy())

    def inputs(prompt: str):
        enc = {k: v.to(args.device) for k, v in encode_prompts(backbone, [image], [prompt]).items()}
        with torch.no_grad():
            return backbone.prepare(enc["pixel_values"].to(dtype), enc["input_ids"], enc["attention_mask"])

    e, length = (int(x) for x in spec[0].split(":"))
    paths = {"full": dict(), f"exit@{e}": dict(criterion=Confidence(1e-9), check_layers=[e]),
             f"spec e={e} L={length}": dict(draft=DraftSettings(e, length))}
    lm_inputs = inputs(PROMPTS[0])

    def call(settings, session=None, new=args.tokens, lm_in=lm_inputs):
        with torch.no_grad():
            res = generate_from_inputs(lm, exits if settings else None, lm_in, generation_config=config,
                                       max_new_tokens=new, eos_token_id=[], session=session, **settings)
        sync()
        return res

    results = {"machine": {**system_info(), "cuda": torch.version.cuda, "device": args.device},
               "settings": vars(args), "shape": shape, "dtype": str(dtype), "calls": {}, "row_batch": {}}
    rows = []
    for name, settings in paths.items():
        session = DecodeSession()
        t0 = time.perf_counter()
        first = call(settings, session)
        first_s = time.perf_counter() - t0
        reference = call(settings).sequences.tolist()  # warm-up of the fresh path
        times = {"fresh": [], "session": []}
        same = first.sequences.tolist() == reference
        for _ in range(args.repeats):
            for key, sess in (("fresh", None), ("session", session)):
                t0 = time.perf_counter()
                res = call(settings, sess)
                times[key].append(time.perf_counter() - t0)
                same = same and res.sequences.tolist() == reference
        fresh, reused = statistics.median(times["fresh"]), statistics.median(times["session"])
        results["calls"][name] = {"fresh_s": times["fresh"], "session_s": times["session"], "first_session_call_s":
                                  first_s, "session_entries": len(session), "tokens_equal": same}
        rows.append(f"| {name} | {fresh * 1e3:.1f} | {reused * 1e3:.1f} | {fresh / reused:.2f} | {first_s * 1e3:.0f} "
                    f"| {'yes' if same else 'NO'} |")
    log(f"\n## {shape} ({dtype}), one prompt, {args.tokens} new tokens per call, median of {args.repeats}\n")
    log("| path | fresh ms/call | session ms/call | fresh / session | first session call ms | tokens equal |")
    log("|---|---|---|---|---|---|")
    for row in rows:
        log(row)

    prompts = [inputs(p) for p in PROMPTS]
    for name, settings in (("full", dict()), (f"exit@{e}", dict(criterion=Confidence(1e-9), check_layers=[e]))):
        alone = [call(settings, lm_in=p).sequences[0].tolist() for p in prompts]
        session = DecodeSession()
        uses_exits = bool(settings)
        t0 = time.perf_counter()
        with torch.no_grad():
            batch = session.rows(lm, exits if uses_exits else None, rows=2, columns=256, generation_config=config,
                                 **settings)
            got, at, waiting, steps = {}, {}, list(range(len(prompts))), 0
            while waiting or at:
                while waiting and batch.free:
                    i = waiting.pop(0)
                    row, token, _ = batch.admit(prompts[i])
                    at[row], got[i] = i, [token]
                for row, (token, _) in batch.step().items():
                    got[at[row]].append(token)
                steps += 1
                for row in [r for r, i in at.items() if len(got[i]) == args.tokens]:
                    batch.release(row)
                    del at[row]
            batch.close()
        sync()
        seconds = time.perf_counter() - t0
        equal = [got[i] == alone[i] for i in range(len(prompts))]
        results["row_batch"][name] = {"prompts": len(prompts), "rows": 2, "steps": steps, "seconds": seconds,
                                      "equal_alone": equal}
        log(f"row batch {name}: {len(prompts)} prompts in 2 rows, {steps} steps, {seconds:.2f} s (capture "
            f"included); each prompt equals its decode alone: {equal}")
    text = json.dumps(results, indent=2, default=str)
    print(text)
    if os.environ.get("OUT"):
        target = Path(os.environ["OUT"]) / f"gpu_session_{shape}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)


if __name__ == "__main__":
    main()
