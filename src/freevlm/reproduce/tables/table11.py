"""Table 11: the fraction of test tokens leaving at each exit, from the method loop's test rows."""

from __future__ import annotations

from freevlm.reproduce.tables.base import Report, Table, markdown_table, section


def render(report: Report) -> list[str]:
    layers = list(report.runs[0]["methods"]["FREE"]["exit_fractions"])
    rows = [[name, *[report.col(["methods", name, "exit_fractions", k], 1, 2) for k in layers]]
            for name in report.cfg.methods]
    return section("Table 11 — fraction of test tokens leaving at each exit (last column: the final layer)",
                   markdown_table(["method", *[f"layer {k}" for k in layers]], rows))


TABLE = Table(render)
