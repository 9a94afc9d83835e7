"""Subset heads (FR-Spec): exit checks and drafts that score only the K most frequent tokens of the vocabulary.

On a real LM the frozen head dominates an exit check and a draft (SmolLM2: a 49k-row head is ~8 layers of
parameters). A `HeadSubset` keeps the rows of the head (or of a linear exit's classifier) for K token ids chosen by
frequency on a training split, so a check or a draft costs K/V of a head:

- **Speculative drafts** come from the subset head; verification always uses the full head, so the output is full
  depth's token for token whatever the subset (a token outside it is simply never drafted; the verifier emits it).
- **Early exit**: the criterion sees the exit's logits over the subset only. Confidence is the softmax renormalised
  over the subset: for the subset's argmax token it is an upper bound of that token's full-vocabulary probability
  (the denominator sums fewer terms), so a subset check fires at least as often as a full check whenever the full
  argmax lies in the subset. When an exit fires, the emitted token is the subset's argmax (no full-head
  confirmation: that would cost the full head again); sampling and beam search see the subset's logits, every other
  token at -inf. A token outside the subset can therefore only come from the final layer.
- **Accounting**: a subset check or draft is charged `fraction` = K/V of a head (`StepRecord.heads`), in the compute
  speedup and in the cost model's seconds.

The ranking of the whole vocabulary (`rank_tokens`, from token-id sequences of the training split) is what is saved
(`save_token_ranking`, `token_ranking.json`, beside the exits or the plan); a subset of size K is its top K, EOS
always included, ids kept in ascending order so that argmax ties break as over the full vocabulary (a subset of the
whole vocabulary decodes exactly as no subset).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from freevlm.errors import FreeVLMError
from freevlm.generation.kernels.common import tensor_state

RANKING_FILE = "token_ranking.json"
RANKING_FORMAT = "freevlm-token-ranking/1"


def rank_tokens(sequences: Iterable[Sequence[int]], vocab_size: int) -> torch.Tensor:
    """Every token id of the vocabulary (V,), the most frequent in `sequences` first; ties and unseen ids by id."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for seq in sequences:
        ids = torch.as_tensor(list(seq), dtype=torch.long)
        if ids.numel():
            if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
                raise FreeVLMError(f"token ids must lie in 0..{vocab_size - 1}")
            counts += torch.bincount(ids, minlength=vocab_size)
    return torch.sort(-counts, stable=True).indices


class HeadSubset:
    """K token ids (ascending) and the head rows for them, gathered once per weight tensor (and re-gathered when the
    weight changes, in place or by `.to(dtype / device)`, as `KVStack`)."""

    def __init__(self, ids: torch.Tensor, vocab_size: int):
        ids = torch.as_tensor(ids, dtype=torch.long).flatten()
        if not ids.numel() or int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
            raise FreeVLMError(f"a head subset needs token ids in 0..{vocab_size - 1}")
        self.ids = torch.unique(ids)  # sorted, deduplicated
        self.vocab_size = vocab_size
        self._rows: dict[int, tuple[torch.Tensor, tuple, torch.Tensor]] = {}

    @classmethod
    def top(cls, ranking: torch.Tensor, size: int, eos_token_ids: Sequence[int], vocab_size: int) -> HeadSubset:
        """The `size` best-ranked ids, EOS included (it takes the place of the last ones when not among them)."""
        if size < 1:
            raise FreeVLMError(f"head subset size must be >= 1, got {size}")
        eos = [int(t) for t in eos_token_ids]
        size = min(size, vocab_size)
        if size < len(eos):
            raise FreeVLMError(f"head subset size {size} cannot hold the {len(eos)} EOS token(s)")
        chosen = [int(t) for t in torch.as_tensor(ranking)[:size].tolist()]
        missing = [t for t in eos if t not in chosen]
        if missing:
            keep = [t for t in chosen if t in eos] + [t for t in chosen if t not in eos]
            chosen = keep[: size - len(missing)] + missing
        return cls(torch.tensor(chosen), vocab_size)

    @property
    def size(self) -> int:
        return int(self.ids.numel())

    @property
    def fraction(self) -> float:
        """What a subset head costs in full heads (K / V)."""
        return self.size / self.vocab_size

    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        """weight (V, D) -> its rows for the subset (K, D)."""
        cached = self._rows.get(id(weight))
        state = tensor_state(weight)
        if cached is None or cached[0] is not weight or cached[1] != state:
            with torch.no_grad():
                rows = weight.detach().index_select(0, self.ids.to(weight.device))
            self._rows[id(weight)] = cached = (weight, state, rows)
        return cached[2]

    def scatter(self, logits: torch.Tensor) -> torch.Tensor:
        """Subset logits (R, K) -> (R, V), every other token at -inf."""
        out = torch.full((logits.shape[0], self.vocab_size), float("-inf"), dtype=logits.dtype, device=logits.device)
        return out.index_copy_(1, self.ids.to(logits.device), logits)

    def token(self, index: torch.Tensor) -> torch.Tensor:
        """Positions in the subset -> token ids."""
        return self.ids.to(index.device)[index]


def head_subset(ranking: torch.Tensor | None, size: int | None, eos_token_ids: Sequence[int],
                vocab_size: int) -> HeadSubset | None:
    """The subset a decode setting asks for (None: the full head)."""
    if size is None:
        return None
    if ranking is None:
        raise FreeVLMError("a head subset needs a token ranking: save one beside the exits (token_ranking.json, "
                           "`freevlm.generation.vocab.save_token_ranking`) or set `vlm.token_ranking`")
    return HeadSubset.top(ranking, size, eos_token_ids, vocab_size)


def save_token_ranking(folder: str | Path, ranking: torch.Tensor, source: str = "") -> Path:
    from freevlm.outputs import write_json

    ranking = torch.as_tensor(ranking, dtype=torch.long)
    Path(folder).mkdir(parents=True, exist_ok=True)  # a plan's folder may not exist yet (the demo writes it last)
    return write_json(Path(folder) / RANKING_FILE, {"format": RANKING_FORMAT, "vocab_size": int(ranking.numel()),
                                                    "source": source, "ranking": ranking.tolist()})


def load_token_ranking(folder: str | Path, vocab_size: int | None = None) -> torch.Tensor | None:
    """The ranking saved in `folder` (None when there is none); refused for another vocabulary size."""
    path = Path(folder) / RANKING_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        ranking = torch.tensor(record["ranking"], dtype=torch.long)
        ok = record.get("format") == RANKING_FORMAT and ranking.numel() == record["vocab_size"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise FreeVLMError(f"not a token ranking ({path}): {err!r}") from None
    if not ok or (vocab_size is not None and ranking.numel() != vocab_size):
        raise FreeVLMError(f"token ranking {path} is for a vocabulary of {ranking.numel()}, not {vocab_size}")
    return ranking
