"""Table 4: captioning, semi-supervised. Its rows are the method loop's (`SeedRun.method_loop`): no measurement of
its own."""

from __future__ import annotations

from freevlm.eval.bootstrap import format_interval, paired_bootstrap
from freevlm.reproduce.tables import plan
from freevlm.reproduce.tables.base import Report, Table, markdown_table, section


def render(report: Report) -> list[str]:
    col, runs = report.col, report.runs
    rows = [["backbone (full depth)", col(["backbone", "metrics", "BLEU-4"]), col(["backbone", "metrics", "CIDEr"]),
             col(["backbone", "metrics", "METEOR"]), col(["backbone", "metrics", "ROUGE-L"]), "1.00", "1.00", "1.00",
             "-", "-"]]
    for name in (*report.cfg.methods, *report.cfg.ablations):
        p = ["methods", name]
        rows.append([name, col(p + ["metrics", "BLEU-4"]), col(p + ["metrics", "CIDEr"]),
                     col(p + ["metrics", "METEOR"]), col(p + ["metrics", "ROUGE-L"]),
                     col(p + ["speed", "parameter_speedup"], 1, 2), col(p + ["speed", "compute_speedup"], 1, 2),
                     col(p + ["wall_clock_vs_full_depth"], 1, 2), runs[0]["methods"][name]["criterion"] + " " +
                     "/".join(str(r["methods"][name]["setting"]) for r in runs),
                     f"{runs[0]['methods'][name]['trainable_per_exit']:,}"])
    intervals = _intervals(report)
    planned = plan.table4_row(report)
    if planned is not None:
        rows.insert(next((i + 1 for i, r in enumerate(rows) if r[0] == "FREE"), len(rows)), planned)
    return section("Table 4 — captioning, semi-supervised (synthetic test split; SPICE: real data only)",
                   "Each method at the setting that is best on dev (§4: 'the best-performing threshold'; ties to the "
                   "faster one). A setting of 1.0 means no token exits, so the row equals the backbone; the dev "
                   "curves under Fig. 4b show every setting."
                   + (" 'FREE + plan': FREE's exits decoded with the configuration `freevlm plan` chose on train/dev "
                      "(exits checked, alpha, gates, KV policy; see 'Exit plan')." if planned is not None else ""),
                   markdown_table(["model", "B@4", "CIDEr", "METEOR", "ROUGE-L", "param", "compute", "wall",
                                   "setting (per seed)", "trained params / exit"], rows),
                   *([intervals] if intervals else []))


def _intervals(report: Report) -> str:
    """With one seed: each row's test CIDEr minus the backbone's, with its paired-bootstrap 95% interval."""
    runs = report.runs
    full = runs[0]["backbone"].get("per_image_cider")
    if len(runs) != 1 or not full:
        return ""
    parts = [f"{name} {format_interval(paired_bootstrap(full, row['per_image_cider'], scale=100))}"
             for name, row in runs[0]["methods"].items() if row.get("per_image_cider")]
    return (f"Test CIDEr minus full depth's, paired-bootstrap 95% interval over {len(full)} test images: "
            + "; ".join(parts) + ".")


TABLE = Table(render)
