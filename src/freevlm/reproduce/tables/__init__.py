"""The report's tables, in the order the report prints them and each seed measures them.

A table is one module with a `TABLE` (see `base.Table`): an optional per-seed `measure` run after the method loop,
and a `render` of its report section. Adding a table = adding a module + one line below. Order matters where one
table's measurement reads another's: Fig. 3 reads the exit-quality table's FREE curve. Every measurement runs
before any section renders, so a section may read a later table's measurement (Table 4 and Fig. 4b show the exit
plan's "FREE + plan" rows); the plan and speculative tables measure last, so they leave the others' numbers as
they were.
"""

from __future__ import annotations

from freevlm.reproduce.tables import (
    exit_quality,
    fig3,
    fig4a,
    fig4b,
    plan,
    rankers,
    speculative,
    table1,
    table2,
    table3,
    table4,
    table5,
    table6,
    table7,
    table8,
    table9,
    table11,
)
from freevlm.reproduce.tables.base import Report, Table

TABLES: tuple[Table, ...] = (
    table4.TABLE,  # captioning, semi-supervised: the method loop's rows
    table1.TABLE,  # NoCaps-style zero-shot transfer
    fig4a.TABLE,  # ablations
    exit_quality.TABLE,  # per-exit agreement and CIDEr, FREE vs no adversarial
    table6.TABLE,  # Gaussian image noise
    table11.TABLE,  # exit fractions
    fig4b.TABLE,  # speedup vs quality; FREE's quality vs alpha
    fig3.TABLE,  # per-layer quality (after exit_quality)
    rankers.TABLE,  # CapFilt's rankers: top-2 precision on dev (random, likelihood, tiny CLIP)
    table9.TABLE,  # unsupervised: KD vs CapFilt
    plan.TABLE,  # `freevlm plan` on FREE's exits (Table 4 and Fig. 4b render its "FREE + plan" rows)
    speculative.TABLE,  # lossless speculative decoding: FREE's vs the baselines' exits as drafters
    table2.TABLE,  # --full: VQA, semi-supervised
    table3.TABLE,  # --full: unsupervised VQA + VisDial
    table5.TABLE,  # --full: MiniGPT-4-shaped, captioning
    table7.TABLE,  # --full: InstructBLIP, captioning
    table8.TABLE,  # --full: MiniGPT-4-shaped, VQA
)

# `reproduce --real`: what a 1-hour budget on the real LM covers (FREE, the baselines, the adversarial ablation, the
# exits one by one, exit fractions, speed vs quality, per-layer quality)
REAL_TABLES: tuple[Table, ...] = (table4.TABLE, fig4a.TABLE, exit_quality.TABLE, table11.TABLE, fig4b.TABLE,
                                  fig3.TABLE)

__all__ = ["REAL_TABLES", "TABLES", "Report", "Table"]
