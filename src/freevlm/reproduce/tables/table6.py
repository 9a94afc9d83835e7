"""Table 6: Gaussian noise on the normalised pixel values, the backbone vs FREE at its dev-chosen alpha."""

from __future__ import annotations

from freevlm.generation.api import DecodeOptions, EarlyExitVLM
from freevlm.reproduce.tables.base import Report, Table, markdown_table, section


def measure(run, core) -> dict:
    free = EarlyExitVLM(core.backbone, core.trained["FREE"])
    free_opts = DecodeOptions(threshold=run.results["methods"]["FREE"]["setting"])
    out = {}
    for sigma in run.cfg.noise_sigmas:
        a = run.captions(core.full, run.test, DecodeOptions(mode="full"), pixel_noise=sigma, noise_seed=run.seed)
        b = run.captions(free, run.test, free_opts, pixel_noise=sigma, noise_seed=run.seed)
        out[str(sigma)] = {"backbone": a.metrics, "FREE": b.metrics, "FREE_speed": b.speed,
                           "FREE_wall": run.wall(free, run.test, free_opts, pixel_noise=sigma)}
    return out


def render(report: Report) -> list[str]:
    col = report.col
    rows = []
    for sigma in report.cfg.noise_sigmas:
        s = str(sigma)
        for who in ("backbone", "FREE"):
            speeds = [col(["noise", s, "FREE_speed", "parameter_speedup"], 1, 2),
                      col(["noise", s, "FREE_speed", "compute_speedup"], 1, 2), col(["noise", s, "FREE_wall"], 1, 2)]
            rows.append([f"σ={sigma}", who, col(["noise", s, who, "BLEU-4"]), col(["noise", s, who, "CIDEr"]),
                         *(speeds if who == "FREE" else ["1.00"] * 3)])
    return section("Table 6 — Gaussian noise on the normalised pixel values",
                   "In-process BLEU-4 and CIDEr (no METEOR: one JVM per cell would dominate the run).",
                   markdown_table(["noise", "model", "B@4", "CIDEr", "param", "compute", "wall"], rows))


TABLE = Table(render, measure, key=("noise",))
