"""Table 1: zero-shot transfer to held-out shapes/colours (NoCaps-style in/near/out-domain), every compared method at
its dev-chosen setting."""

from __future__ import annotations

from freevlm.data.synthetic import load_synthetic_nocaps
from freevlm.generation.api import DecodeOptions, EarlyExitVLM
from freevlm.reproduce.tables.base import Report, Table, markdown_table, section

DOMAINS = ("in-domain", "near-domain", "out-domain")


def measure(run, core) -> dict:
    out = {}
    rows = {"backbone": (core.full, DecodeOptions(mode="full"))}
    for name in run.cfg.methods:
        rows[name] = (EarlyExitVLM(core.backbone, core.trained[name]), run.method_options(name))
    for domain in DOMAINS:
        samples = load_synthetic_nocaps(run.data_root, domain)[: run.cfg.nocaps_images]
        for name, (vlm, opts) in rows.items():
            r = run.captions(vlm, samples, opts)
            out.setdefault(name, {})[domain] = {"CIDEr": r.metrics["CIDEr"], "speed": r.speed}
            if domain == "out-domain" and name != "backbone":
                out[name][domain]["wall_clock_vs_full_depth"] = run.wall(vlm, samples, opts)
    return out


def render(report: Report) -> list[str]:
    col = report.col
    rows = []
    for name in ("backbone", *report.cfg.methods):
        out_dom = ["nocaps", name, "out-domain"]
        rows.append([name, *[col(["nocaps", name, d, "CIDEr"]) for d in DOMAINS],
                     col(out_dom + ["speed", "parameter_speedup"], 1, 2),
                     col(out_dom + ["speed", "compute_speedup"], 1, 2),
                     "1.00" if name == "backbone" else col(out_dom + ["wall_clock_vs_full_depth"], 1, 2)])
    return section("Table 1 — zero-shot transfer to held-out shapes/colours (NoCaps-style domains, CIDEr)",
                   "near-domain: one object has one held-out attribute; out-domain: only held-out shapes and colours. "
                   "In-process CIDEr; SPICE needs a download and is not reported.",
                   markdown_table(["model", *DOMAINS, "param (out)", "compute (out)", "wall (out)"], rows))


TABLE = Table(render, measure, key=("nocaps",))
