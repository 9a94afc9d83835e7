"""Table 2 (--full): VQA, semi-supervised: stage 1 on the VQA split, then FREE and the baselines."""

from __future__ import annotations

from freevlm.reproduce.tables.base import Report, Table, full_only, markdown_table, method_rows, section


def measure(run, core) -> dict:
    return run.sub_run("vqa", task="vqa").run_light()


def render(report: Report) -> list[str]:
    if not report.has("vqa_semi"):
        return []
    rows = method_rows(report, lambda r: r["vqa_semi"], ["accuracy"])
    return section("Table 2 — VQA, semi-supervised (synthetic VQA, VQAv2 accuracy)",
                   markdown_table(["model", "accuracy", "param", "compute", "wall"], rows))


TABLE = Table(render, measure, key=("vqa_semi",), when=full_only)
