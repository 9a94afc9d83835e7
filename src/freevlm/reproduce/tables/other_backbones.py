"""Tables 5, 7, 8 (--full): the method loop on other backbones of the embedded default (each pretrained once and
cached in the reproduce folder). One `Table` per (family, task)."""

from __future__ import annotations

from dataclasses import replace

from freevlm.default import pretrained_default
from freevlm.reproduce.tables.base import Report, Table, full_only, markdown_table, method_rows, section


def other_backbone_table(family: str, task: str, title: str) -> Table:
    """The Table for `family`'s backbone on `task`; results at other_backbones/<family>/<task>."""
    quality = ["BLEU-4", "CIDEr", "METEOR"] if task == "caption" else ["accuracy"]

    def measure(run, core) -> dict:
        # clip=None: the CapFilt ranker is trained once, with the main backbone, and only Table 9 uses it
        pretrained_default(run.root, replace(run.cfg.default, family=family, clip=None), seed=0,
                           progress=run.progress)
        pretrained = run.root / f"pretrain-{family}-s0" / "backbone"
        return run.sub_run(f"{family}/{task}", task=task, pretrained=pretrained).run_light()

    def render(report: Report) -> list[str]:
        if not report.has("other_backbones"):
            return []
        rows = method_rows(report, lambda r: r["other_backbones"][family][task], quality)
        return section(title, markdown_table(["model", *quality, "param", "compute", "wall"], rows))

    return Table(render, measure, key=("other_backbones", family, task), when=full_only)
