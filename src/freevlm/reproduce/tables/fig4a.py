"""Fig. 4a: the ablations (trained in the method loop beside the compared methods), BLEU-1 as the paper plots it."""

from __future__ import annotations

from freevlm.reproduce.tables.base import Report, Table, markdown_table, section


def render(report: Report) -> list[str]:
    if not report.cfg.ablations:
        return []
    col = report.col
    rows = [[name, col(["methods", name, "metrics", "BLEU-1"]), col(["methods", name, "metrics", "CIDEr"]),
             col(["methods", name, "speed", "parameter_speedup"], 1, 2),
             col(["methods", name, "speed", "compute_speedup"], 1, 2),
             col(["methods", name, "wall_clock_vs_full_depth"], 1, 2)] for name in ("FREE", *report.cfg.ablations)]
    return section("Fig. 4a — ablations (BLEU-1, as the paper plots, and CIDEr)",
                   markdown_table(["variant", "BLEU-1", "CIDEr", "param", "compute", "wall"], rows))


TABLE = Table(render)
