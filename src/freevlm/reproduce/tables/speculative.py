"""Speculative decoding (lossless): which drafter is best — FREE's exits or the baselines' trained linear heads.

Every exit can draft for self-speculative decoding (`DecodeOptions(mode="speculative")`): layers 1..e and the exit
propose up to k tokens, layers e+1..N verify them in one pass, and the output is full depth's. Since the output is
fixed, a drafter is judged by speed alone, and speed comes from how often its drafts are accepted vs what drafting
costs (a FREE exit is a transformer layer; a linear head is a classifier; MuE's frozen head costs nothing to train).

Per seed, per drafter (FREE; every linear-head baseline and frozen-head method of the run): a small grid (two draft
exits x draft length 4 / 8, plus adaptive drafting at confidence 0.5) is timed on a few development images at batch
1, all settings of all drafters interleaved; each drafter's fastest setting is then decoded on the whole test split
(acceptance, tokens per verification, layer calls per token, outputs identical to full depth's) and timed on the
wall-clock subset of test against full depth and transformers' `generate`, interleaved.
"""

from __future__ import annotations

import time

import torch

from freevlm.baselines import METHODS
from freevlm.eval.efficiency import measure_throughput
from freevlm.eval.evaluate import decode
from freevlm.generation.api import DecodeOptions, EarlyExitVLM
from freevlm.generation.speculative import SpeculativeStats
from freevlm.reproduce.tables.base import Report, Table, markdown_table, section

DRAFT_LENGTHS = (4, 8)
ADAPTIVE = 0.5  # adaptive drafting: stop once the exit's confidence falls below this (at the longest draft length)
DRAFTER_KINDS = ("transformer", "linear", "frozen-head")


def drafter_names(methods, trained) -> list[str]:
    """FREE first, then each method of the run whose exits can draft (linear heads, the frozen head)."""
    names = [n for n in methods if n in METHODS and METHODS[n].exit_kind in DRAFTER_KINDS and n in trained]
    return sorted(names, key=lambda n: n != "FREE")


def draft_layers(layers) -> list[int]:
    """The grid's draft exits: the shallowest exit and the middle one (all of them would grow the grid with depth)."""
    layers = sorted(layers)
    return sorted({layers[0], layers[len(layers) // 2]})


def setting_name(e: int, k: int, t: float | None) -> str:
    return f"e{e}-k{k}" + (f"-a{t:g}" if t is not None else "")


def grid(layers, lengths=DRAFT_LENGTHS, adaptive: float | None = ADAPTIVE) -> list[tuple[int, int, float | None]]:
    out = [(e, k, None) for e in draft_layers(layers) for k in lengths]
    if adaptive is not None:
        out += [(e, max(lengths), adaptive) for e in draft_layers(layers)]
    return out


def _item(vlm, ex, opts, stats: SpeculativeStats | None = None):
    def fn():
        res = vlm.generate([ex.image_path], [ex.prompt], opts, tokenizer_decode=False)
        if stats is not None:
            stats.add(res.speculative)
        return res.num_tokens

    return fn


def _hf_item(vlm, ex, max_new_tokens: int):
    """transformers' own greedy `generate` on one example: tokens up to and including EOS."""
    from freevlm.data.images import load_image
    from freevlm.train.batches import encode_prompts

    bb = vlm.backbone
    enc = {k: v.to(vlm.device) for k, v in encode_prompts(bb, [load_image(ex.image_path)], [ex.prompt]).items()}
    eos = bb.lm.config.eos_token_id

    def fn():
        out = bb.hf_generate(max_new_tokens=max_new_tokens, do_sample=False, **enc)
        gen = out[:, 1:] if bb.lm.is_encoder_decoder else out[:, enc["input_ids"].shape[1]:]
        row = gen[0].tolist()
        return next((i + 1 for i, t in enumerate(row) if t == eos), len(row))

    return fn


def measure(run, core) -> dict:
    start = time.perf_counter()
    cfg = run.cfg
    n = core.backbone.lm.num_layers
    names = drafter_names(cfg.methods, core.trained)
    vlms = {name: EarlyExitVLM(core.backbone, core.trained[name]) for name in names}
    full_opts = DecodeOptions(mode="full")
    max_new = full_opts.max_new_tokens

    # 1. dev: every drafter's grid, interleaved at batch 1; the fastest setting per drafter
    dev = run.task.prompts(run.dev[: cfg.speculative_dev_images])
    settings, stats, runs = {}, {}, {"full_depth": [_item(core.full, ex, full_opts) for ex in dev]}
    for name in names:
        for e, k, t in grid(core.trained[name].layers):
            key = f"{name}/{setting_name(e, k, t)}"
            settings[key] = (name, DecodeOptions(mode="speculative", draft_layer=e, draft_length=k, draft_threshold=t))
            stats[key] = SpeculativeStats()
            runs[key] = [_item(vlms[name], ex, settings[key][1], stats[key]) for ex in dev]
    with torch.no_grad():
        dev_timing = measure_throughput(runs, repeats=2)  # batch-1 timings on a shared CPU are noisy: 2 passes
    dev_full = dev_timing["full_depth"]["tokens_per_second"]
    drafters = {}
    for name in names:
        rows = []
        for key, (owner, opts) in settings.items():
            if owner == name:
                tps = dev_timing[key]["tokens_per_second"]
                rows.append({"name": key.split("/", 1)[1], "draft_layer": opts.draft_layer,
                             "draft_length": opts.draft_length, "draft_threshold": opts.draft_threshold,
                             "tokens_per_second": tps, "vs_full_depth": tps / dev_full,
                             **stats[key].to_json(n)})
        best = max(rows, key=lambda r: r["tokens_per_second"])
        drafters[name] = {"kind": METHODS[name].exit_kind, "exit_layers": list(core.trained[name].layers),
                          "dev": rows, "best": {k: best[k] for k in ("name", "draft_layer", "draft_length",
                                                                      "draft_threshold")}}

    def best_opts(name):
        b = drafters[name]["best"]
        return DecodeOptions(mode="speculative", draft_layer=b["draft_layer"], draft_length=b["draft_length"],
                             draft_threshold=b["draft_threshold"])

    # 2. test: the whole split decoded (acceptance, identical outputs), the wall-clock subset timed
    examples = run.task.prompts(run.test)
    bs = cfg.eval_batch_size
    reference = {p["key"]: p["prediction"] for p in decode(core.full, examples, full_opts, batch_size=bs,
                                                           progress=run.progress, desc="full depth").preds}
    for name in names:
        d = decode(vlms[name], examples, best_opts(name), batch_size=bs, progress=run.progress,
                   desc=f"speculative: {name}")
        drafters[name]["test"] = {"identical_outputs": sum(p["prediction"] == reference[p["key"]] for p in d.preds),
                                  "outputs": len(d.preds), **d.speculative.to_json(n)}
    timed = examples[: cfg.speed_images]
    runs = {"full_depth": [_item(core.full, ex, full_opts) for ex in timed],
            "hf_generate": [_hf_item(core.full, ex, max_new) for ex in timed]}
    runs.update({name: [_item(vlms[name], ex, best_opts(name)) for ex in timed] for name in names})
    with torch.no_grad():
        timing = measure_throughput(runs, repeats=3)
    fd, hf = timing["full_depth"]["tokens_per_second"], timing["hf_generate"]["tokens_per_second"]
    for name in names:
        tps = timing[name]["tokens_per_second"]
        drafters[name]["test"].update(tokens_per_second=tps, vs_full_depth=tps / fd, vs_hf_generate=tps / hf)
    return {"drafters": drafters, "num_layers": n, "dev_images": len(dev), "test_images": len(examples),
            "speed_images": len(timed), "dev_full_depth_tokens_per_second": dev_full,
            "full_depth_tokens_per_second": fd, "hf_generate_tokens_per_second": hf,
            "seconds": time.perf_counter() - start}


def _setting(b: dict) -> str:
    s = f"exit {b['draft_layer']}, {b['draft_length']} drafts"
    return s + (f", adaptive {b['draft_threshold']:g}" if b.get("draft_threshold") is not None else "")


def render(report: Report) -> list[str]:
    if not report.has("speculative"):
        return []
    runs, col = report.runs, report.col
    first = runs[0]["speculative"]
    names = list(first["drafters"])
    rows = []
    for name in names:
        p = ["speculative", "drafters", name, "test"]
        same = "; ".join(f"{r['speculative']['drafters'][name]['test']['identical_outputs']}/"
                         f"{r['speculative']['drafters'][name]['test']['outputs']}" for r in runs)
        rows.append([f"{name} ({first['drafters'][name]['kind']})",
                     " / ".join(_setting(r["speculative"]["drafters"][name]["best"]) for r in runs),
                     col(p + ["acceptance_rate"]), col(p + ["tokens_per_verification"], 1, 2),
                     col(p + ["layer_calls_per_token"], 1, 2), same, col(p + ["tokens_per_second"], 1, 0),
                     col(p + ["vs_full_depth"], 1, 2), col(p + ["vs_hf_generate"], 1, 2)])
    mean_vs_full = {name: sum(r["speculative"]["drafters"][name]["test"]["vs_full_depth"] for r in runs) / len(runs)
                    for name in names}
    best = max(mean_vs_full, key=mean_vs_full.get)
    layers = ", ".join(map(str, draft_layers(first["drafters"][names[0]]["exit_layers"])))
    grid_rows = []
    for name in names:
        for i, row in enumerate(first["drafters"][name]["dev"]):
            p = ["speculative", "drafters", name, "dev", i]
            grid_rows.append([name, row["name"], col(p + ["acceptance_rate"]),
                              col(p + ["tokens_per_verification"], 1, 2), col(p + ["layer_calls_per_token"], 1, 2),
                              col(p + ["vs_full_depth"], 1, 2)])
    return [*section(
        "Speculative decoding (lossless): which drafter is best",
        f"Each method's exits draft for self-speculative decoding: layers 1..e and the exit propose tokens, layers "
        f"e+1..{first['num_layers']} verify them in one pass, so the output is full depth's and only speed differs. "
        f"Per drafter, the fastest of its grid (exits {layers} x {'/'.join(map(str, DRAFT_LENGTHS))} drafts, and "
        f"adaptive drafting at confidence {ADAPTIVE:g}) on "
        f"{first['dev_images']} dev images (tokens/s, batch 1, every setting interleaved) is decoded on the "
        f"{first['test_images']} test images (acceptance, tokens per verification, layer calls per token: full depth "
        f"is {first['num_layers']}; outputs identical to full depth's, per seed) and timed on {first['speed_images']} "
        f"of them vs full depth and transformers' `generate` (interleaved). Identical outputs can fall short of all "
        f"only by floating-point ties (a block verification sums in another order than one-token steps).",
        markdown_table(["drafter", "setting (per seed)", "accepted %", "tokens / verification", "layer calls / token",
                        "identical", "tokens/s", "vs full", "vs HF generate"], rows),
        f"**Best drafter here: {best}** ({mean_vs_full[best]:.2f}x full depth's tokens/s on test, mean over seeds; "
        f"ranked: {', '.join(f'{n} {v:.2f}x' for n, v in sorted(mean_vs_full.items(), key=lambda kv: -kv[1]))}). "
        f"Batch-1 timings on a shared CPU move by several percent between runs: compare within the spread."),
        "### Speculative: every draft setting on dev (mean ± std over seeds)", "",
        markdown_table(["drafter", "setting", "accepted %", "tokens / verification", "layer calls / token",
                        "vs full (dev)"], grid_rows), ""]


TABLE = Table(render, measure, key=("speculative",))
