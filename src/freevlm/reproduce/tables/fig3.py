"""Fig. 3: quality per layer when every token leaves at one layer, through the frozen head, through a linear head per
layer (vanilla early exit, trained in the method loop's linear pass) and through FREE's exits."""

from __future__ import annotations

import statistics

from freevlm.eval.plots import plot_layers
from freevlm.exits import ExitSpec, build_exits
from freevlm.generation.api import DecodeOptions, EarlyExitVLM
from freevlm.reproduce.seed import PER_LAYER, forced_exit, per_layer_layers
from freevlm.reproduce.tables.base import Report, Table, markdown_table, section

VANILLA = "linear head per layer (vanilla EE)"


def measure(run, core) -> dict:
    bb = core.backbone
    n = bb.lm.num_layers
    layers = per_layer_layers(run.cfg, n)
    frozen = build_exits(bb.lm, ExitSpec("frozen-head", layers))
    force = DecodeOptions(threshold=1e-9)
    curves = {}
    for name, stack in (("frozen head", frozen), (VANILLA, core.trained[PER_LAYER])):
        curves[name] = {}
        for layer in layers:
            r = run.captions(EarlyExitVLM(bb, forced_exit(stack, layer)), run.dev, force)
            curves[name][layer] = 100 * r.metrics["CIDEr"]
    full = run.captions(core.full, run.dev, DecodeOptions(mode="full"))
    for curve in curves.values():
        curve[n] = 100 * full.metrics["CIDEr"]
    # FREE's exits at their own layers (measured by the exit-quality table), and the full model at the end
    curves["FREE exits"] = {k: v["CIDEr"] for k, v in run.results["exit_quality"]["FREE"].items()}
    curves["FREE exits"][n] = curves["frozen head"][n]
    return curves


def render(report: Report) -> list[str]:
    if not report.has("per_layer"):
        return []
    runs = report.runs
    names = list(runs[0]["per_layer"])
    per_layer = {name: {int(k): statistics.mean(r["per_layer"][name][k] for r in runs)
                        for k in runs[0]["per_layer"][name]} for name in names}
    plot_layers(per_layer, report.folder / "per_layer.png", "CIDEr (dev)", "Fig. 3: every token leaves at one layer")
    all_layers = sorted({k for c in per_layer.values() for k in c})
    rows = [[name, *[f"{per_layer[name][k]:.1f}" if k in per_layer[name] else "" for k in all_layers]]
            for name in names]
    return section("Fig. 3 — per-layer quality",
                   "Method: the whole dev split is decoded with every token forced to leave at one layer (a single "
                   "exit there, threshold ~0): through the frozen final norm + head, through a linear head trained "
                   "for that layer (vanilla early exit, trained like DeeBLIP), and through FREE's exit transformers "
                   "(at their layers only). The last column is the full model.",
                   "![per-layer](per_layer.png)", markdown_table(["exit", *all_layers], rows))


TABLE = Table(render, measure, key=("per_layer",), when=lambda cfg, full: cfg.per_layer)
