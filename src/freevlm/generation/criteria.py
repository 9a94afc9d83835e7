"""When a token leaves: small pluggable exit criteria.

A criterion is asked once per exit a token reaches, in layer order, for the rows of the batch still deciding. It may
keep per-token state across the exits of one decoding step (patience counts agreements, similarity remembers the
previous hidden state); `new_step` makes that state fresh for every step.

- `Confidence` (DeeBERT, FREE §3.5): exit when the exit's max softmax probability exceeds alpha.
- `Entropy` (DeeBERT's original): exit when the entropy of the exit's distribution is below a threshold.
- `Patience` (PABEE): exit when `patience` consecutive exits agree with the one before them on the argmax token.
- `Similarity` (MuE): exit when the hidden state stops changing: cosine(h_i, h_{i-1}) above a threshold, where
  h_{i-1} is the input of the exit's layer. It needs no logits, so the engine only runs an exit head for rows that
  actually leave (cheap decisions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from freevlm.errors import FreeVLMError


@dataclass
class Confidence:
    threshold: float = 0.8  # alpha; the paper picks it from {0.5, ..., 1.0} on the development split
    needs_logits: bool = True

    def __post_init__(self):
        if not 0.0 < self.threshold <= 1.0:
            raise FreeVLMError(f"confidence threshold alpha must lie in (0, 1], got {self.threshold}")

    def never_exits(self) -> bool:
        return self.threshold >= 1.0  # a softmax probability never *exceeds* 1

    def new_step(self, batch_size: int, device: torch.device) -> dict:
        return {}

    def __call__(self, state: dict, rows: torch.Tensor, logits: torch.Tensor, hidden, prev_hidden) -> torch.Tensor:
        return torch.softmax(logits.float(), dim=-1).amax(dim=-1) > self.threshold


@dataclass
class Entropy:
    threshold: float = 0.5  # nats; exit when the entropy is below it (0 = never)
    needs_logits: bool = True

    def __post_init__(self):
        if not self.threshold >= 0:  # also refuses NaN, which compares False with everything
            raise FreeVLMError(f"entropy threshold must be >= 0, got {self.threshold}")

    def never_exits(self) -> bool:
        return self.threshold <= 0.0

    def new_step(self, batch_size: int, device: torch.device) -> dict:
        return {}

    def __call__(self, state, rows, logits, hidden, prev_hidden) -> torch.Tensor:
        logp = torch.log_softmax(logits.float(), dim=-1)
        return -(logp.exp() * logp).sum(-1) < self.threshold


@dataclass
class Patience:
    patience: int = 2  # consecutive agreeing exits needed (PABEE's t); the first exit can never fire
    needs_logits: bool = True

    def __post_init__(self):
        if isinstance(self.patience, float) and self.patience.is_integer():
            self.patience = int(self.patience)
        if not isinstance(self.patience, int) or self.patience < 1:
            raise FreeVLMError(f"patience must be a whole number >= 1, got {self.patience}")

    def never_exits(self) -> bool:
        return False

    def new_step(self, batch_size: int, device: torch.device) -> dict:
        return {
            "prev": torch.full((batch_size,), -1, dtype=torch.long, device=device),
            "count": torch.zeros(batch_size, dtype=torch.long, device=device),
        }

    def __call__(self, state, rows, logits, hidden, prev_hidden) -> torch.Tensor:
        pred = logits.argmax(dim=-1)
        same = pred == state["prev"][rows]
        count = torch.where(same, state["count"][rows] + 1, torch.zeros_like(pred))
        state["prev"][rows] = pred
        state["count"][rows] = count
        return count >= self.patience


@dataclass
class Similarity:
    threshold: float = 0.99  # cosine similarity of a layer's output with its input above which the token leaves
    needs_logits: bool = False

    def __post_init__(self):
        if not -1.0 <= self.threshold <= 1.0:
            raise FreeVLMError(f"similarity threshold must lie in [-1, 1], got {self.threshold}")

    def never_exits(self) -> bool:
        return self.threshold >= 1.0

    def new_step(self, batch_size: int, device: torch.device) -> dict:
        return {}

    def __call__(self, state, rows, logits, hidden, prev_hidden) -> torch.Tensor:
        sim = torch.nn.functional.cosine_similarity(hidden.float(), prev_hidden.float(), dim=-1)
        return sim > self.threshold


@dataclass
class Gated:
    """Any criterion behind cheap exit gates (`gates.py`): at each exit the gate reads h_i first; only where it opens
    do the exit transformer and head run and the wrapped criterion decide. Under catch-up, whose exit transformers
    run for whole token groups anyway (their caches need every token), a closed gate saves the head only."""

    base: Confidence | Entropy | Patience | Similarity
    gates: object  # ExitGates
    threshold: float = 0.5  # open where the gate's probability exceeds this

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.0:
            raise FreeVLMError(f"gate threshold must lie in [0, 1], got {self.threshold}")

    @property
    def needs_logits(self) -> bool:
        return self.base.needs_logits

    def never_exits(self) -> bool:
        return self.base.never_exits()

    def new_step(self, batch_size: int, device: torch.device) -> dict:
        return self.base.new_step(batch_size, device)

    def open(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """(R,) bool: check the exit at `layer` for these rows' states h_i (R, D)."""
        if layer not in self.gates.layers:
            return torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
        return torch.sigmoid(self.gates(layer, hidden)) > self.threshold

    def __call__(self, state, rows, logits, hidden, prev_hidden) -> torch.Tensor:
        return self.base(state, rows, logits, hidden, prev_hidden)


CRITERIA = {"confidence": Confidence, "entropy": Entropy, "patience": Patience, "similarity": Similarity}


def make_criterion(name: str, value: float) -> Confidence | Entropy | Patience | Similarity:
    """A criterion from its name and its one setting (alpha, entropy threshold, patience, similarity)."""
    if name not in CRITERIA:
        raise FreeVLMError(f"unknown exit criterion {name!r}; expected one of {', '.join(CRITERIA)}")
    return CRITERIA[name](value) if name == "patience" else CRITERIA[name](float(value))
