"""Figures: quality vs speedup curves (Fig. 4b), per-layer quality (Fig. 3), exit-layer histograms, alpha sweeps."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on CI machines
import matplotlib.pyplot as plt  # noqa: E402


def save_figure(fig, path: str | Path) -> None:
    """Write a PNG atomically (a temporary file renamed into place; see freevlm.outputs) and close the figure."""
    from freevlm.outputs import atomic_write

    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    finally:
        plt.close(fig)


def plot_sweep(curves: dict[str, dict], path: str | Path, speedup: str = "compute_speedup",
               title: str = "quality vs speedup") -> None:
    """One line per method: x = speedup, y = quality, one point per setting (annotated with the setting)."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, rows in curves.items():
        settings = sorted(rows)
        xs = [rows[s][speedup] for s in settings]
        ys = [rows[s]["quality"] for s in settings]
        ax.plot(xs, ys, marker="o", label=name)
        for s, x, y in zip(settings, xs, ys):
            ax.annotate(f"{s:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    metric = next(iter(next(iter(curves.values())).values()))["quality_metric"]
    _finish(fig, ax, path, speedup.replace("_", " ") + " (x)", metric, title)


def _finish(fig, ax, path, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_layers(curves: dict[str, dict[int, float]], path: str | Path, ylabel: str, title: str) -> None:
    """Quality per LM layer, one line per method (Fig. 3)."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, per_layer in curves.items():
        layers = sorted(per_layer)
        ax.plot(layers, [per_layer[i] for i in layers], marker="o", label=name)
    _finish(fig, ax, path, "LM layer", ylabel, title)


def plot_exit_histogram(fractions: dict[int, float], path: str | Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    layers = sorted(fractions)
    ax.bar([str(i) for i in layers], [fractions[i] for i in layers])
    ax.set_xlabel("exit layer (last bar: the final layer)")
    ax.set_ylabel("fraction of tokens")
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)
