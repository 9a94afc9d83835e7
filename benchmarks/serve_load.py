"""Serving under load: `freevlm serve` on loopback, 1, 4, 8 and 16 concurrent clients, per decoding mode.

A server (the same app `freevlm serve` runs, in a background thread on a free loopback port) takes requests from
N client threads, each sending its share of `--requests` one after another (raw HTTP, non-streaming; one image and the
caption prompt each, `--max-tokens` tokens at most). Per (mode, clients): generated tokens per second of wall-clock
time, the ratio to one client (requests one at a time: the sequential baseline), the p50 / p95 request latency, and
tokens per CPU-second of this process (server and clients: on a machine shared with other work, the wall clock
measures the neighbours too; CPU time is what this run used). Every cell runs once per round, the cells interleaved,
`--rounds` rounds: the medians are reported, so a neighbour's burst falls on every cell alike. Bounded: at most
`--requests` per cell and round, and no new request is sent after `--max-seconds`.

Models: the toy (the embedded default's trained backbone and FREE exits from a demo run, `--run`; `--train` trains
what is missing, several CPU minutes), `--random` (the default's architecture with random weights and exits: a quick
run that measures the machinery, not FREE's exits), or `--real` (the real VLM from `make real`, skipped if not built).

    python benchmarks/serve_load.py --run runs/demo [--train]
    python benchmarks/serve_load.py --random --requests 16
    python benchmarks/serve_load.py --real --real-only --real-run runs/real --clients 1 8
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

import torch
from PIL import Image

from freevlm.eval.report import markdown_table
from freevlm.generation.api import MODES, DecodeOptions, EarlyExitVLM
from freevlm.machine import system_info
from freevlm.outputs import write_json
from freevlm.serve.app import serve_in_thread
from freevlm.serve.config import ServeConfig
from freevlm.train.batches import CAPTION_PROMPT


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=Path("runs/demo"), help="a demo run folder (the toy)")
    p.add_argument("--train", action="store_true", help="train what the demo run lacks first")
    p.add_argument("--random", action="store_true", help="the toy's architecture with random weights (quick)")
    p.add_argument("--real", action="store_true", help="the real VLM from `make real` (skipped if not built)")
    p.add_argument("--real-only", action="store_true", help="with --real: skip the toy")
    p.add_argument("--real-run", type=Path, default=Path("runs/real"))
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--requests", type=int, default=32, help="requests per (mode, clients) cell")
    p.add_argument("--max-tokens", type=int, default=20)
    p.add_argument("--max-seconds", type=float, default=60.0, help="no new request after this, per cell")
    p.add_argument("--rounds", type=int, default=3, help="each cell runs once per round; medians reported")
    p.add_argument("--threshold", type=float, default=0.8, help="early exit: alpha")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_load.json"))
    return p.parse_args(argv)


def load_toy(args) -> tuple[EarlyExitVLM, list[bytes], str]:
    """The toy VLM and a few test images (PNG bytes)."""
    from freevlm.data.synthetic import load_synthetic_captions

    if args.random:
        from freevlm.default import DefaultConfig, build_default_model
        from freevlm.exits import ExitSpec, build_exits

        backbone = build_default_model(DefaultConfig(), seed=0)
        torch.manual_seed(1)
        vlm = EarlyExitVLM(backbone, build_exits(backbone.lm, ExitSpec("transformer", [2, 4, 6, 8, 10])))
        colours = ["red", "green", "blue", "white", "yellow", "purple", "orange", "grey"]
        return vlm, [png(Image.new("RGB", (64, 64), c)) for c in colours], "toy (random weights)"
    sys.path.insert(0, str(Path(__file__).parent))
    from decode_speed import load_run

    vlm, data_root = load_run(args.run, 0, args.train)
    samples = load_synthetic_captions(data_root, "test")[:16]
    return vlm, [Path(s.image_path).read_bytes() for s in samples], "toy (trained default, FREE exits)"


def load_real(args) -> tuple[EarlyExitVLM, list[bytes], str] | None:
    backbone, exits = args.real_run / "real-stage1-s0" / "backbone", args.real_run / "real-free-s0" / "exits"
    if not (backbone / "config.json").exists() or not exits.exists():
        print(f"--real: no real VLM in {args.real_run} (run `make real` first); skipped")
        return None
    from freevlm.data.synthetic import load_synthetic_captions

    vlm = EarlyExitVLM.from_pretrained(backbone, exits)
    samples = load_synthetic_captions(args.real_run / "data", "test")[:16]
    return vlm, [Path(s.image_path).read_bytes() for s in samples], "real VLM (SmolLM2-135M LM)"


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def request_body(image: bytes, mode: str, max_tokens: int) -> bytes:
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    return json.dumps({"model": "freevlm", "max_tokens": max_tokens, "mode": mode, "messages": [
        {"role": "user", "content": [{"type": "text", "text": CAPTION_PROMPT},
                                     {"type": "image_url", "image_url": {"url": url}}]}]}).encode()


def send(url: str, body: bytes) -> dict:
    req = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.loads(resp.read())


def run_cell(url: str, bodies: list[bytes], clients: int, max_seconds: float) -> dict:
    """`clients` threads send `bodies` (round robin), each one request at a time."""
    latencies, tokens, batched = [], [0], []
    lock = threading.Lock()
    start, cpu = time.perf_counter(), time.process_time()

    def client(mine: list[bytes]) -> None:
        for body in mine:
            if time.perf_counter() - start > max_seconds:
                return
            t0 = time.perf_counter()
            answer = send(url, body)
            with lock:
                latencies.append(time.perf_counter() - t0)
                tokens[0] += answer["usage"]["completion_tokens"]
                batched.append(answer["freevlm"]["batched"])

    threads = [threading.Thread(target=client, args=(bodies[i::clients],)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    return {"requests": len(latencies), "tokens": tokens[0], "seconds": seconds, "cpu_seconds": cpu_seconds,
            "latencies": latencies, "batched": all(batched)}


def summary(runs: list[dict]) -> dict:
    """A cell's rounds: median throughputs, latency percentiles over every request."""
    ordered = sorted(x for r in runs for x in r["latencies"])
    return {"rounds": len(runs), "requests": sum(r["requests"] for r in runs), "tokens": sum(r["tokens"] for r in runs),
            "tokens_per_second": statistics.median(r["tokens"] / r["seconds"] for r in runs),
            "tokens_per_cpu_second": statistics.median(r["tokens"] / r["cpu_seconds"] for r in runs),
            "p50_s": statistics.median(ordered),
            "p95_s": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
            "batched": all(r["batched"] for r in runs)}


def measure(vlm: EarlyExitVLM, images: list[bytes], name: str, args) -> list[dict]:
    modes = [m for m in args.modes if m == "full" or vlm.exits is not None]
    cfg = ServeConfig(options=DecodeOptions(threshold=args.threshold), max_batch_size=max(args.clients),
                      max_columns=128, default_max_tokens=args.max_tokens, max_waiting=4 * max(args.clients))
    rows = []
    with serve_in_thread(vlm, cfg) as (url, _):
        for mode in modes:  # warm-up: the first request of a mode builds its buffers
            send(url, request_body(images[0], mode, args.max_tokens))
        bodies = {mode: [request_body(images[i % len(images)], mode, args.max_tokens) for i in range(args.requests)]
                  for mode in modes}
        runs: dict[tuple[str, int], list[dict]] = {(m, c): [] for m in modes for c in args.clients}
        for r in range(args.rounds):  # interleaved: every cell once per round
            for mode, clients in runs:
                runs[(mode, clients)].append(run_cell(url, bodies[mode], clients, args.max_seconds))
            print(f"  round {r + 1} of {args.rounds} done", flush=True)
        for (mode, clients), cell_runs in runs.items():
            cell = {"model": name, "mode": mode, "clients": clients, **summary(cell_runs)}
            one = summary(runs[(mode, args.clients[0])])
            cell["vs_one_client"] = cell["tokens_per_second"] / one["tokens_per_second"]
            cell["cpu_vs_one_client"] = cell["tokens_per_cpu_second"] / one["tokens_per_cpu_second"]
            rows.append(cell)
        with urllib.request.urlopen(url + "/metrics") as resp:
            tail = [line for line in resp.read().decode().splitlines()
                    if line.startswith(("freevlm_exit_fraction", "freevlm_draft_acceptance"))]
        print("  " + "; ".join(tail))
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    models = [] if args.real and args.real_only else [load_toy(args)]
    if args.real:
        models.append(load_real(args))
    rows = []
    for loaded in filter(None, models):
        print(f"{loaded[2]}:")
        rows += measure(*loaded, args)
    print(markdown_table(["model", "mode", "clients", "tokens/s", "vs 1 client", "tokens/CPU-s", "vs 1 client",
                          "p50 latency s", "p95 latency s", "step-level batched"],
                         [[r["model"], r["mode"], r["clients"], round(r["tokens_per_second"], 1),
                           round(r["vs_one_client"], 2), round(r["tokens_per_cpu_second"], 1),
                           round(r["cpu_vs_one_client"], 2), round(r["p50_s"], 3), round(r["p95_s"], 3), r["batched"]]
                          for r in rows]))
    write_json(args.out, {"system": system_info(), "settings": {k: str(v) for k, v in vars(args).items()},
                          "cells": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
