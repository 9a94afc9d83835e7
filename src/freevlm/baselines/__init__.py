"""The early-exit methods the paper compares against, adapted to VLMs, and FREE itself, as one table.

A method is a small rule, not a copy of the pipeline: which exits it trains and how (a `train/stage2.py`
variant), which criterion decides at inference and over which settings it is swept, and which KV policy it uses.
Every method reuses the shared training loop, losses and generation engine.
"""

from __future__ import annotations

from freevlm.baselines import deebert, free, leebert, mue, pabee
from freevlm.baselines.method import Method

METHODS = {m.name: m for m in (free.METHOD, deebert.METHOD, pabee.METHOD, leebert.LEEBLIP, leebert.METHOD,
                               mue.METHOD)}
# The paper's four baselines, and the original LeeBERT (learned mutual distillation) beside its LeeBLIP reading.
BASELINES = ("DeeBLIP", "PABEE-BLIP", "LeeBLIP", "LeeBERT", "MuE")

__all__ = ["BASELINES", "METHODS", "Method"]
