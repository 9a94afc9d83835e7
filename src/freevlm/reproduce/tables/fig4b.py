"""Fig. 4b: speedup vs quality on the dev split (every method's and ablation's curve from the method loop), FREE's
exit histogram, and FREE's quality-vs-alpha table with the measured wall-clock ratio."""

from __future__ import annotations

import statistics

from freevlm.eval.plots import plot_exit_histogram, plot_sweep
from freevlm.reproduce.tables import plan
from freevlm.reproduce.tables.base import Report, Table, markdown_table, section


def render(report: Report) -> list[str]:
    runs, folder = report.runs, report.folder
    layers = list(runs[0]["methods"]["FREE"]["exit_fractions"])
    plot_exit_histogram({int(k): statistics.mean(r["methods"]["FREE"]["exit_fractions"][k] for r in runs)
                         for k in layers}, folder / "exit_histogram.png", "FREE: tokens per exit layer (test)")
    curves = {}
    for name in (*report.cfg.methods, *report.cfg.ablations):
        settings = runs[0]["curves"][name].keys()
        curves[name] = {float(s): {"quality_metric": "CIDEr (dev)",
                                   **{key: statistics.mean(r["curves"][name][s][key] for r in runs)
                                      for key in ("quality", "compute_speedup", "parameter_speedup")}}
                        for s in settings}
    plot_sweep(curves, folder / "speedup_vs_quality_param.png", speedup="parameter_speedup",
               title="Fig. 4b: parameter speedup vs CIDEr (dev)")
    plot_sweep(curves, folder / "speedup_vs_quality_compute.png", speedup="compute_speedup",
               title="compute speedup (exit checks paid) vs CIDEr (dev)")
    rows = [[float(s), v["quality"], v["parameter_speedup"], v["compute_speedup"],
             report.col(["curves", "FREE", s, "wall_clock_vs_full_depth"], 1, 2)]
            for s, v in zip(runs[0]["curves"]["FREE"], curves["FREE"].values())]
    planned = plan.fig4b_row(report)
    note = []
    if planned is not None:
        rows.append(planned)
        note = ["'FREE + plan': the configuration `freevlm plan` chose (" +
                " / ".join(plan.describe(r["plan"]["choice"]) for r in runs) + ", per seed) decoded on this dev "
                "split; the planner decoded its candidates on the first "
                f"{runs[0]['plan']['dev_images']} dev images and charges every exit check it pays.", ""]
    return [*section("Fig. 4b — speedup vs quality (dev split, one point per setting)",
                     "![param](speedup_vs_quality_param.png) ![compute](speedup_vs_quality_compute.png)",
                     "![exits](exit_histogram.png)"),
            "### FREE: quality vs alpha (dev; CIDEr and the counted speedups are means over seeds, wall is mean ± "
            "std)", "", markdown_table(["alpha", "CIDEr", "param", "compute", "wall"], rows), "", *note]


TABLE = Table(render)
