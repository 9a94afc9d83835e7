"""What a report table is: an optional per-seed measurement and a renderer, plus the helpers renderers share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from freevlm.eval.report import markdown_table, mean_std

if TYPE_CHECKING:
    from freevlm.reproduce.config import ReproduceConfig
    from freevlm.reproduce.seed import SeedCore, SeedRun


def ms(values, scale: float = 1.0, digits: int = 1) -> str:
    """'mean ± std' over seeds of `values` x `scale`."""
    return mean_std(values, digits=digits, scale=scale)


def lookup(result: Any, path) -> Any:
    for k in path:
        result = result[k]
    return result


@dataclass
class Report:
    """The per-seed results as the renderers read them, and the report folder (for figures)."""

    runs: list[dict]
    cfg: ReproduceConfig
    folder: Path

    def col(self, path, scale: float = 100.0, digits: int = 1) -> str:
        """'mean ± std' over seeds of the number at `path` in each seed's results (quality x100 by default)."""
        return ms([lookup(r, path) for r in self.runs], scale, digits)

    def has(self, key: str) -> bool:
        return key in self.runs[0]


def always(cfg: ReproduceConfig, full: bool) -> bool:
    return True


@dataclass(frozen=True)
class Table:
    """One section of the report.

    `render(report)` returns its Markdown lines ([] when the seeds' results do not hold its data). `measure(run,
    core)`, if given, runs once per seed after the method loop (`SeedRun.method_loop`, then `run.run_seed`), when
    `when(cfg, full)` holds; its return value is stored in the seed's results at `key` (results.json keeps that
    layout)."""

    render: Callable[[Report], list[str]]
    measure: Callable[[SeedRun, SeedCore], Any] | None = None
    key: tuple[str, ...] = ()
    when: Callable[[ReproduceConfig, bool], bool] = always


def full_only(cfg: ReproduceConfig, full: bool) -> bool:
    return full


def method_rows(report: Report, get: Callable[[dict], dict], quality_cols) -> list[list]:
    """Table rows for the backbone and each method of a `SeedRun.run_light`-shaped result (`get(run)` selects it)."""
    def c(path, scale=100.0, digits=1):
        return ms([lookup(get(r), path) for r in report.runs], scale, digits)

    rows = [["backbone (full depth)", *[c(["backbone", "metrics", q]) for q in quality_cols], "1.00", "1.00", "1.00"]]
    for name in report.cfg.methods:
        p = ["methods", name]
        rows.append([name, *[c(p + ["metrics", q]) for q in quality_cols], c(p + ["speed", "parameter_speedup"], 1, 2),
                     c(p + ["speed", "compute_speedup"], 1, 2), c(p + ["wall_clock_vs_full_depth"], 1, 2)])
    return rows


def section(title: str, *parts: str) -> list[str]:
    """A report section: '## title', then each part as its own paragraph."""
    lines = [f"## {title}", ""]
    for part in parts:
        lines += [part, ""]
    return lines


__all__ = ["Report", "Table", "always", "full_only", "lookup", "markdown_table", "method_rows", "ms", "section"]
