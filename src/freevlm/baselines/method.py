"""What defines an early-exit method here: its exits, how they are trained, and how they decide at inference."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str  # as the paper's tables print it
    variant: str | None  # stage-2 variant that trains its exits (train/stage2.py VARIANTS); None: nothing to train
    exit_kind: str  # transformer | linear | frozen-head
    criterion: str  # confidence | patience | similarity | entropy
    settings: tuple[float, ...]  # criterion settings swept on the dev split; the best is used on the test split
    kv_policy: str = "propagate"  # what skipped layers' caches get (generation/kv.py)
