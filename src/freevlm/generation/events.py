"""What the engine records when rows leave at an exit (a leaf: the dynamic engine and the static one both emit it)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ExitEvent:
    """Rows that left at one exit during a step: what the skip policy needs to fill their skipped slots."""

    rows: torch.Tensor  # (R,) batch rows
    layer: int  # exit layer (1-based)
    index: int  # position of that exit among the exits (= its exit-cache slot for transformer exits)
    state: torch.Tensor  # (R, D) state to propagate (h_i, or the exit's output with source="exit")
    cols: torch.Tensor  # (R,) the column of the token
    rope: tuple[torch.Tensor, torch.Tensor] | None  # (R, hd) cos/sin at that column (Llama)
