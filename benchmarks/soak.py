"""Soak benchmark of the Python API (not part of the default suite; results: BENCHMARKS.md).

Runs N generations (default 1,000) through `EarlyExitVLM.generate` with random inputs, and checks that the process
does not grow and that every output is well formed:

- inputs: random PIL images (sizes 1..64 px a side; RGB, grayscale "L" and RGBA), random prompt strings (words of the
  vocabulary, unseen words, punctuation, empty prompts), batch sizes 1..4;
- settings: every mode (early_exit / full / speculative), criterion and threshold, KV policy (and propagation
  source), subsets of the exits, greedy / sampling / beam search (with and without sampling), num_return_sequences,
  repetition penalties, max_new_tokens 1..12;
- models: tiny random models of every family in `freevlm.backbones.tiny` (each with transformer, linear and
  frozen-head exits), or with `--run` the trained demo model (`make demo`'s checkpoints) if present.

Checks: resident memory (RSS) after the warm-up (the first `--warmup` generations) never exceeds the RSS at the end of
the warm-up by more than `--max-growth` percent (default 5); no NaN or infinity in the logits the engine reports
(`output_logits=True`, every mode but speculative) nor in the speculative statistics; every result well formed (one
row per returned sequence, ids in the vocabulary, at most max_new_tokens tokens, padding after the end, a short row
ends on EOS, exit layers among the configured exits or the final layer, final layer only in mode "full"); a sample of
greedy speculative runs gives mode "full"'s tokens. Exits non-zero when a check fails.

    python benchmarks/soak.py                                # 1,000 generations on tiny models, 1 thread
    python benchmarks/soak.py --run runs/demo                # the trained demo model, if `make demo` has run
    python benchmarks/soak.py --replay 123                   # rerun generation 123 alone (prints its inputs)

Each generation's inputs come from its own seed (`--seed`, index), so a failure reported in the JSON replays with
`--replay INDEX`.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
import traceback
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from freevlm.backbones.tiny import FAMILIES, TinySize, build_tiny, tiny_processor
from freevlm.data.tokenizer import build_word_tokenizer
from freevlm.exits import ExitSpec, build_exits
from freevlm.generation.api import EarlyExitVLM
from freevlm.generation.criteria import CRITERIA
from freevlm.generation.kv import POLICIES

WORDS = ["a", "photo", "of", "red", "green", "blue", "square", "circle", "triangle", "small", "large", "what",
         "colour", "is", "it", "?", "the", "shape", "on", "left"]
EXTRA_WORDS = ["unseen", "Words!", "ünïcode", "12", "...", "", "  "]
LM_LAYERS = 5
EXIT_LAYERS = {"transformer": [1, 3], "linear": [1, 2, 3, 4], "frozen-head": [2]}
IMAGE_MODES = ("RGB", "L", "RGBA")


# --- resident memory ----------------------------------------------------------------------------------------------

def _proc_status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


try:
    import psutil

    _PROC = psutil.Process()

    def rss_bytes() -> int:
        return _PROC.memory_info().rss

    RSS_SOURCE = f"psutil {psutil.__version__} memory_info().rss"
except ImportError:  # pragma: no cover - psutil is optional
    def rss_bytes() -> int:
        return (_proc_status_kib("VmRSS") or 0) * 1024

    RSS_SOURCE = "/proc/self/status VmRSS"


def hwm_bytes() -> int | None:
    """The kernel's resident high-water mark (catches transient peaks inside a generation); Linux only."""
    kib = _proc_status_kib("VmHWM")
    return kib * 1024 if kib is not None else None


def mib(n: int | float | None) -> float | None:
    return None if n is None else round(n / 2**20, 2)


# --- models -------------------------------------------------------------------------------------------------------

@torch.no_grad()
def _make_eos_likely(vlm: EarlyExitVLM, strength: float) -> None:
    """Point the head's EOS row at the tokens the random model usually predicts, so rows (and beams) end at
    different steps and the EOS paths of every search get exercised (as the property tests do)."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(3)]
    res = vlm.generate(images, ["a photo of", "what", ""], mode="full", max_new_tokens=6, output_logits=True,
                       tokenizer_decode=False)
    usual = torch.stack(res.logits).flatten(0, 1).argmax(-1)
    lm = vlm.backbone.lm
    eos = vlm.backbone.processor.tokenizer.eos_token_id
    head = lm.lm_head.weight
    head[eos] = head[usual].mean(0) * (1.3 if lm.is_encoder_decoder else strength)


def tiny_models() -> dict[str, EarlyExitVLM]:
    """Every tiny family, each with transformer, linear and frozen-head exits (keys 'family/kind')."""
    tok = build_word_tokenizer([" ".join(WORDS)])
    size = TinySize(vocab_size=len(tok), lm_layers=LM_LAYERS)
    models = {}
    for i, family in enumerate(FAMILIES):
        own = copy.deepcopy(tok)  # a processor may add tokens (SmolVLM's layout tokens); the vocabulary follows them
        processor = tiny_processor(family, own, size)
        bb = build_tiny(family, replace(size, vocab_size=len(own)), processor=processor, seed=i)
        bb.model.eval()
        _make_eos_likely(EarlyExitVLM(bb), strength=3.0)
        for kind, layers in EXIT_LAYERS.items():
            torch.manual_seed(100 + i)
            exits = build_exits(bb.lm, ExitSpec(kind, list(layers)))
            if kind == "linear":  # a trained linear exit differs from the head it was initialised from
                with torch.no_grad():
                    for p in exits.parameters():
                        p.add_(0.05 * torch.randn_like(p))
            exits.eval()
            models[f"{family}/{kind}"] = EarlyExitVLM(bb, exits)
    return models


def demo_models(run: Path, seed: int = 0) -> dict[str, EarlyExitVLM] | None:
    backbone, exits = run / f"stage1-s{seed}" / "backbone", run / f"free-s{seed}" / "exits"
    if not (backbone / "config.json").is_file() or not exits.is_dir():
        return None
    vlm = EarlyExitVLM.from_pretrained(backbone, exits)
    vlm.backbone.model.eval()
    return {f"demo:{run}": vlm}


# --- random inputs ------------------------------------------------------------------------------------------------

def random_image(r: random.Random) -> tuple[Image.Image, dict]:
    h, w = r.randint(1, 64), r.randint(1, 64)
    mode = r.choice(IMAGE_MODES)
    seed = r.randrange(2**31)
    channels = {"RGB": (3,), "L": (), "RGBA": (4,)}[mode]
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, *channels), dtype=np.uint8)
    return Image.fromarray(arr, mode), {"size": [w, h], "mode": mode, "seed": seed}


def random_prompt(r: random.Random, words: list[str]) -> str:
    pool = words + EXTRA_WORDS
    return " ".join(r.choice(pool) for _ in range(r.randint(0, 8)))


def draw_case(index: int, seed: int, model_names: list[str], models: dict[str, EarlyExitVLM], words: list[str]):
    """Generation `index`'s inputs and settings, from its own seed (so it replays alone)."""
    r = random.Random(f"{seed}:{index}")
    name = r.choice(model_names)
    vlm = models[name]
    layers = list(vlm.exits.layers)
    batch = r.randint(1, 4)
    images, image_info = zip(*(random_image(r) for _ in range(batch)))
    prompts = [random_prompt(r, words) for _ in range(batch)]
    mode = r.choices(["early_exit", "full", "speculative"], weights=[5, 2, 3])[0]
    kw: dict = {"mode": mode, "max_new_tokens": r.randint(1, 12)}
    if mode == "early_exit":
        criterion = r.choice(list(CRITERIA))
        kw["criterion"] = criterion
        kw["threshold"] = {"confidence": lambda: round(r.uniform(0.02, 1.0), 3),
                           "entropy": lambda: round(r.uniform(0.0, 4.0), 3),
                           "patience": lambda: r.randint(1, 3),
                           "similarity": lambda: round(r.uniform(-0.5, 1.0), 3)}[criterion]()
        kw["kv_policy"] = r.choice(POLICIES)
        if kw["kv_policy"] == "propagate":
            kw["propagate_from"] = r.choice(["hidden", "exit"])
        if len(layers) > 1 and r.random() < 0.3:
            kw["exit_layers"] = sorted(r.sample(layers, r.randint(1, len(layers))))
    search = r.choices(["greedy", "sample", "beam", "beam-sample"], weights=[4, 3, 2, 1] if mode != "speculative"
                       else [6, 4, 0, 0])[0]
    if search in ("sample", "beam-sample"):
        kw["do_sample"] = True
        kw["temperature"] = round(r.uniform(0.3, 2.0), 2)
        kw["top_k"] = r.choice([None, 0, 3, 50])
        kw["top_p"] = r.choice([None, 0.5, 0.9, 1.0])
    if search in ("beam", "beam-sample"):
        kw["num_beams"] = r.randint(2, 4)
        kw["num_return_sequences"] = r.randint(1, kw["num_beams"])
        kw["length_penalty"] = r.choice([1.0, 0.0, -1.0, 2.0])
        kw["early_stopping"] = r.choice([False, True, "never"])
    elif search == "sample" and r.random() < 0.3:
        kw["num_return_sequences"] = r.randint(2, 3)
    if mode == "speculative":
        kw["draft_layer"] = r.choice(layers)
        kw["draft_length"] = r.randint(1, 8)
        kw["draft_threshold"] = r.choice([None, round(r.uniform(0.0, 1.0), 2)])
    else:
        kw["output_logits"] = True
        if r.random() < 0.2:
            extra = r.choice(["repetition_penalty", "no_repeat_ngram_size", "min_new_tokens"])
            kw[extra] = {"repetition_penalty": lambda: r.choice([0.8, 1.3, 2.0]),
                         "no_repeat_ngram_size": lambda: r.randint(1, 3),
                         "min_new_tokens": lambda: r.randint(1, kw["max_new_tokens"])}[extra]()
    compare_full = mode == "speculative" and search == "greedy" and r.random() < 0.25
    torch_seed = r.randrange(2**31)
    case = {"index": index, "model": name, "batch": batch, "images": list(image_info), "prompts": prompts,
            "search": search, "options": kw, "torch_seed": torch_seed, "compare_full": compare_full}
    return vlm, list(images), prompts, kw, case


# --- checks -------------------------------------------------------------------------------------------------------

def check_result(vlm: EarlyExitVLM, res, case: dict) -> tuple[list[str], int, int]:
    """(problems, non-finite values, empty beam hypotheses) of one result."""
    kw = case["options"]
    problems = []
    lm = vlm.backbone.lm
    n = lm.num_layers
    vocab = lm.lm_head.weight.shape[0]
    tok = vlm.backbone.processor.tokenizer
    eos, pad = tok.eos_token_id, tok.pad_token_id
    rows = case["batch"] * kw.get("num_return_sequences", 1)
    max_new = kw["max_new_tokens"]
    seqs = res.sequences
    if seqs.dim() != 2 or seqs.shape[0] != rows:
        problems.append(f"sequences shape {tuple(seqs.shape)}, expected ({rows}, <= {max_new})")
    elif not 1 <= seqs.shape[1] <= max_new:
        problems.append(f"{seqs.shape[1]} generated columns for max_new_tokens={max_new}")
    if seqs.dtype != torch.long or (seqs.numel() and (int(seqs.min()) < 0 or int(seqs.max()) >= vocab)):
        problems.append(f"ids outside the vocabulary ({seqs.dtype}, range {seqs.min()}..{seqs.max()}, V={vocab})")
    for what, v in (("texts", res.texts), ("exit_layers", res.exit_layers), ("trace", res.trace)):
        if len(v) != rows:
            problems.append(f"{len(v)} {what} for {rows} rows")
    if not all(isinstance(t, str) for t in res.texts):
        problems.append("a text is not a string")
    allowed = set(kw.get("exit_layers") or vlm.exits.layers) | {n}
    if kw["mode"] == "full" or kw["mode"] == "speculative":
        allowed = {n}
    ids = seqs.tolist()
    empty = 0
    for i, (layers, tr) in enumerate(zip(res.exit_layers, res.trace)):
        if not tr and kw.get("num_beams", 1) > 1 and not layers:
            # Beam search found fewer finite-scored hypotheses than num_return_sequences (sampling with top-p/top-k
            # or n-gram bans leave too few candidates): the padding is a placeholder, as transformers' own generate
            # returns one (score -1e9). Counted, not a failure.
            empty += 1
            if any(t != pad for t in ids[i]):
                problems.append(f"row {i}: an empty hypothesis that is not all padding ({ids[i]})")
            continue
        if len(layers) != len(tr) or not 1 <= len(tr) <= max_new:
            problems.append(f"row {i}: {len(layers)} exit layers, {len(tr)} trace entries (max_new {max_new})")
            continue
        if not set(layers) <= allowed:
            problems.append(f"row {i}: exit layers {sorted(set(layers))} not within {sorted(allowed)}")
        if i < len(ids):
            row, k = ids[i], len(tr)
            if any(t != pad for t in row[k:]):
                problems.append(f"row {i}: tokens after the end ({row[k:]}) are not padding")
            if k < max_new and row[k - 1] != eos:
                problems.append(f"row {i}: ends at {k} < {max_new} tokens without EOS")
            if eos in row[: k - 1]:
                problems.append(f"row {i}: EOS before the end")
            if k < kw.get("min_new_tokens", 0):
                problems.append(f"row {i}: {k} tokens < min_new_tokens={kw['min_new_tokens']}")
    nonfinite = 0
    if kw.get("output_logits"):
        if res.logits is None or not res.logits:
            problems.append("output_logits=True but no logits")
        else:
            nonfinite = sum(int((~torch.isfinite(s)).sum()) for s in res.logits)
            if any(s.shape[-1] != vocab for s in res.logits):
                problems.append("logits of the wrong width")
    if kw["mode"] == "speculative":
        st = res.speculative
        if st is None:
            problems.append("speculative mode without statistics")
        else:
            values = [st.acceptance_rate, st.tokens_per_verification] if hasattr(st, "tokens_per_verification") \
                else [st.acceptance_rate]
            if not all(math.isfinite(v) for v in values) or not 0.0 <= st.acceptance_rate <= 1.0:
                problems.append(f"speculative statistics {values}")
                nonfinite += sum(not math.isfinite(v) for v in values)
    if not math.isfinite(res.seconds) or res.seconds < 0:
        problems.append(f"seconds = {res.seconds}")
    return problems, nonfinite, empty


def _tokens(res) -> list[list[int]]:
    ids = res.sequences.tolist()
    return [ids[i][: len(tr)] for i, tr in enumerate(res.trace)]


# --- the soak -----------------------------------------------------------------------------------------------------

def machine() -> dict:
    from freevlm.machine import system_info

    info = system_info()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                info["lscpu_model_name"] = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    info["platform"] = platform.platform()
    info["memory_total_gib"] = None
    kib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                kib = int(line.split()[1])
    except OSError:
        pass
    if kib:
        info["memory_total_gib"] = round(kib / 2**20, 1)
    import transformers

    info["transformers"] = transformers.__version__
    return info


def run_case(vlm, images, prompts, kw, case) -> tuple[object, list[str], int, int]:
    torch.manual_seed(case["torch_seed"])
    res = vlm.generate(images, prompts, **kw)
    problems, nonfinite, empty = check_result(vlm, res, case)
    if case["compare_full"]:
        full_kw = {k: v for k, v in kw.items() if k not in ("draft_layer", "draft_length", "draft_threshold")}
        full = vlm.generate(images, prompts, **{**full_kw, "mode": "full"})
        if _tokens(full) != _tokens(res) or full.texts != res.texts:
            problems.append(f"speculative tokens {_tokens(res)} differ from full depth's {_tokens(full)}")
    return res, problems, nonfinite, empty


def slope_kib_per_generation(points: list[tuple[int, int]]) -> float | None:
    if len(points) < 2:
        return None
    x = np.array([p[0] for p in points], dtype=float)
    y = np.array([p[1] for p in points], dtype=float)
    return round(float(np.polyfit(x, y, 1)[0]) / 1024, 3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--generations", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=50, help="generations before the RSS baseline is taken")
    p.add_argument("--max-growth", type=float, default=5.0, help="allowed RSS growth after warm-up, percent")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--run", type=Path, default=None, help="use the trained demo model in this run folder if present")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "soak.json")
    p.add_argument("--replay", type=int, default=None, help="rerun only this generation index, print its inputs")
    p.add_argument("--max-failures-listed", type=int, default=20)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    models = None
    model_source = "tiny random models of every family (freevlm.backbones.tiny)"
    if args.run is not None:
        models = demo_models(args.run)
        if models is None:
            print(f"note: no trained demo model under {args.run} (stage1-s0/backbone, free-s0/exits); "
                  f"using tiny random models")
        else:
            model_source = f"trained demo model in {args.run}"
    if models is None:
        models = tiny_models()
    names = sorted(models)
    words = sorted({w for w in next(iter(models.values())).backbone.processor.tokenizer.get_vocab()
                    if not w.startswith("<")} | set(WORDS))
    build_seconds = time.perf_counter() - t0

    if args.replay is not None:
        vlm, images, prompts, kw, case = draw_case(args.replay, args.seed, names, models, words)
        print(json.dumps(case, indent=1))
        res, problems, nonfinite, empty = run_case(vlm, images, prompts, kw, case)
        print("texts:", res.texts, "\nexit layers:", res.exit_layers, "\nproblems:", problems, "non-finite:", nonfinite,
              "empty beam hypotheses:", empty)
        return 1 if problems or nonfinite else 0

    warmup = min(args.warmup, args.generations)
    print(f"soak: {args.generations} generations ({warmup} warm-up), {model_source}: {len(names)} model/exit sets; "
          f"{args.threads} thread(s); RSS via {RSS_SOURCE}")
    rss_start, hwm_start = rss_bytes(), hwm_bytes()
    rss_warm = hwm_warm = None
    objects_warm = None
    peak_after, peak_after_at = 0, None
    samples: list[tuple[int, int]] = []  # (generation, RSS) after each post-warm-up generation
    series = []  # every 10th generation, for the report
    failures, malformed, nonfinite_runs, nonfinite_values, tokens, compared = [], 0, 0, 0, 0, 0
    empty_runs, empty_rows = [], 0
    counts = {k: Counter() for k in ("mode", "search", "model", "kv_policy", "criterion", "image_mode", "batch",
                                     "exit_layer", "row_length", "row_end")}
    gen_seconds = []
    loop_start = time.perf_counter()
    for i in range(args.generations):
        vlm, images, prompts, kw, case = draw_case(i, args.seed, names, models, words)
        counts["mode"][kw["mode"]] += 1
        counts["search"][case["search"]] += 1
        counts["model"][case["model"]] += 1
        counts["batch"][case["batch"]] += 1
        counts["kv_policy"][kw.get("kv_policy", "-")] += 1
        counts["criterion"][kw.get("criterion", "-")] += 1
        for im in case["images"]:
            counts["image_mode"][im["mode"]] += 1
        start = time.perf_counter()
        crashed = False
        try:
            res, problems, nonfinite, empty = run_case(vlm, images, prompts, kw, case)
            tokens += res.num_tokens
            if empty:
                empty_runs.append(i)
                empty_rows += empty
            for layers in res.exit_layers:
                counts["exit_layer"].update(layers)
                counts["row_length"][len(layers)] += 1
                counts["row_end"]["eos" if len(layers) < kw["max_new_tokens"] else "max_new_tokens"] += 1
            compared += case["compare_full"]
            del res
        except Exception as e:  # noqa: BLE001 - a soak records every failure and carries on
            crashed = True
            problems, nonfinite = [f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"], 0
            case["traceback"] = traceback.format_exc(limit=6)[-1500:]
        gen_seconds.append(time.perf_counter() - start)
        if nonfinite:
            nonfinite_runs += 1
            nonfinite_values += nonfinite
            problems.append(f"{nonfinite} non-finite logits / statistics")
        if problems:
            malformed += not crashed
            case["crashed"] = crashed
            failures.append({**case, "problems": problems})
            print(f"  generation {i}: FAILED {problems[0]}  (replay: --replay {i})", flush=True)
        rss = rss_bytes()
        if i + 1 == warmup:
            gc.collect()
            rss_warm, hwm_warm = rss_bytes(), hwm_bytes()
            objects_warm = len(gc.get_objects())
            print(f"  warm-up done after {warmup} generations: RSS {mib(rss_warm)} MiB", flush=True)
        elif i + 1 > warmup:
            samples.append((i + 1, rss))
            if rss > peak_after:
                peak_after, peak_after_at = rss, i + 1
        if (i + 1) % 10 == 0:
            series.append([i + 1, mib(rss)])
        if (i + 1) % 100 == 0:
            el = time.perf_counter() - loop_start
            print(f"  {i + 1}/{args.generations}: {el:.0f}s, RSS {mib(rss)} MiB, {len(failures)} failures",
                  flush=True)
    seconds = time.perf_counter() - loop_start
    gc.collect()
    rss_end, hwm_end = rss_bytes(), hwm_bytes()
    objects_end = len(gc.get_objects())
    if rss_warm is None:
        rss_warm = rss_start
    if not samples:
        peak_after, peak_after_at = rss_end, args.generations
    growth = 100.0 * (peak_after - rss_warm) / rss_warm
    hwm_growth = 100.0 * (hwm_end - hwm_warm) / hwm_warm if hwm_end and hwm_warm else None

    checks = {
        f"peak RSS after warm-up within {args.max_growth}% of RSS at warm-up end": growth <= args.max_growth,
        "no NaN / inf in logits or speculative statistics": nonfinite_runs == 0,
        "no failed or malformed generation": not failures,
    }
    gs = sorted(gen_seconds)
    report = {
        "benchmark": "soak: random-input generations through EarlyExitVLM.generate",
        "generations": args.generations,
        "warmup_generations": warmup,
        "seconds": round(seconds, 2),
        "build_seconds": round(build_seconds, 2),
        "generations_per_second": round(args.generations / seconds, 2) if seconds else None,
        "tokens": tokens,
        "speculative_vs_full_comparisons": compared,
        "generation_seconds": {"median": round(gs[len(gs) // 2], 4), "p99": round(gs[int(0.99 * (len(gs) - 1))], 4),
                               "max": round(gs[-1], 4)} if gs else None,
        "rss_source": RSS_SOURCE,
        "rss_mib": {"start": mib(rss_start), "warmup_end": mib(rss_warm), "peak_after_warmup": mib(peak_after),
                    "peak_after_warmup_at_generation": peak_after_at, "end": mib(rss_end)},
        "rss_growth_pct": round(growth, 3),
        "rss_slope_kib_per_generation": slope_kib_per_generation(samples),
        "hwm_mib": {"start": mib(hwm_start), "warmup_end": mib(hwm_warm), "end": mib(hwm_end)},
        "hwm_growth_pct": round(hwm_growth, 3) if hwm_growth is not None else None,
        "python_objects": {"warmup_end": objects_warm, "end": objects_end},
        "max_growth_pct": args.max_growth,
        "nan_count": nonfinite_runs,
        "nonfinite_values": nonfinite_values,
        "failures": len(failures),
        "malformed": malformed,
        "failure_examples": failures[: args.max_failures_listed],
        "empty_beam_hypotheses": {"rows": empty_rows, "generations": empty_runs[: args.max_failures_listed],
                                  "note": "beam search with fewer finite-scored candidates than num_return_sequences "
                                          "returns all-padding placeholders, as transformers does; not a failure"},
        "checks": checks,
        "passed": all(checks.values()),
        "models": model_source,
        "model_sets": names,
        "tiny_size": {"lm_layers": LM_LAYERS, "exit_layers": EXIT_LAYERS} if model_source.startswith("tiny") else None,
        "counts": {k: dict(sorted(v.items(), key=lambda kv: (str(type(kv[0])), kv[0]))) for k, v in counts.items()},
        "rss_series_mib": series,
        "seed": args.seed,
        "threads": args.threads,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "env": {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "OMP_NUM_THREADS") if k in os.environ},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")

    print(f"\n{args.generations} generations in {seconds:.1f}s ({report['generations_per_second']}/s, {tokens} tokens, "
          f"median {report['generation_seconds']['median'] * 1000:.1f} ms)")
    print(f"RSS: {mib(rss_start)} MiB at start, {mib(rss_warm)} MiB after warm-up, peak {mib(peak_after)} MiB after "
          f"warm-up (generation {peak_after_at}), {mib(rss_end)} MiB at the end: growth {growth:+.2f}% "
          f"(slope {report['rss_slope_kib_per_generation']} KiB/generation); VmHWM {mib(hwm_warm)} -> "
          f"{mib(hwm_end)} MiB")
    print(f"non-finite: {nonfinite_runs} generations; failures: {len(failures)} ({malformed} malformed); "
          f"{empty_rows} empty beam hypotheses in {len(empty_runs)} generations (not failures)")
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    print(f"wrote {args.out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
