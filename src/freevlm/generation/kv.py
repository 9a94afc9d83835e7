"""What the layers a token skipped get in their KV cache.

When a token exits at layer i, layers i+1..N (and the exits after i) never ran for it, yet later tokens that go
deeper attend to its keys and values there. Leaving those entries empty silently corrupts every later token, so
one of three policies always fills them:

- `propagate` (CALM's state propagation): the exited state is fed through each skipped layer's K/V projections
  (with the layer's own input norm, and RoPE for Llama-family LMs). The state is the backbone's h_i by default
  (`source="hidden"`, as in CALM); `source="exit"` uses the exit transformer's output instead, which FREE trains to
  resemble the final layer's. Cost per skipped layer: one norm + two projections (about a sixth of an OPT layer).
- `copy` (MuE-style, and the cheapest): each skipped layer reuses the K/V the exit layer i itself stored for the token
  (no computation; only a copy). Note this is not CALM's propagation, which recomputes K/V per layer.
- `catch_up`: nothing is approximated. The skipped layers run for the exited token later, batched with the next token
  that goes deep (or at a final flush), so the cache ends up exactly as a full-depth forward would leave it.

Batches. transformers' `DynamicCache` appends K/V for every row at once, so each layer must receive an entry for
every row at every step. Under `propagate`/`copy` that is what happens: rows that exited get their entries from the
policy while the remaining rows run the layer, through `rows_view` below (a thin view, not a second cache). Under
`catch_up` a batch moves together: a row that exits keeps riding along with the rows still deciding (its token is
already chosen), and the step stops only when every row has exited; the deeper layers then catch up for all rows at
once. This keeps one cache length per layer for all rows, which `catch_up` needs, and it is exact; it saves nothing
while any row of the batch is still deciding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Cache, EncoderDecoderCache

from freevlm.errors import FreeVLMError

POLICIES = ("propagate", "copy", "catch_up")


@dataclass
class SkipPolicy:
    name: str = "propagate"  # one of POLICIES
    source: str = "hidden"  # propagate only: "hidden" (backbone h_i, CALM) or "exit" (the exit's output state)

    def __post_init__(self):
        if self.name not in POLICIES:
            raise FreeVLMError(f"unknown KV policy {self.name!r}; expected one of {', '.join(POLICIES)}")
        if self.source not in ("hidden", "exit"):
            raise FreeVLMError(f"propagation source must be 'hidden' or 'exit', got {self.source!r}")

    @property
    def batch_moves_together(self) -> bool:
        return self.name == "catch_up"


def self_attention_cache(cache: Cache) -> Cache:
    return cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache


class _MergedRowsCache:
    """A layer run on some rows of the batch writes their K/V; the cache receives K/V for all rows.

    `update` scatters the running rows' new keys/values into a full-batch tensor whose other rows hold the policy's
    fill, appends that to the real cache, and hands back only the running rows' history for their attention.
    """

    def __init__(self, cache: Cache, rows: torch.Tensor, fill: tuple[torch.Tensor, torch.Tensor]):
        self.cache = cache
        self.rows = rows
        self.fill = fill  # (B, H, q, hd) keys and values for every row; the running rows' part is overwritten

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys = self.fill[0].index_copy(0, self.rows, key_states)
        values = self.fill[1].index_copy(0, self.rows, value_states)
        all_keys, all_values = self.cache.update(keys, values, layer_idx, *args, **kwargs)
        return all_keys[self.rows], all_values[self.rows]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.cache.get_seq_length(layer_idx)


class _RowsOfLayers:
    """Read-only view of a cross-attention cache's layers restricted to some rows (T5's encoder K/V)."""

    class _Layer:
        def __init__(self, layer, rows):
            self.keys = layer.keys[rows]
            self.values = layer.values[rows]

    def __init__(self, cache: Cache, rows: torch.Tensor):
        self._cache, self._rows = cache, rows
        self.layers = self

    def __getitem__(self, idx: int):
        return self._Layer(self._cache.layers[idx], self._rows)

    def update(self, *args, **kwargs):  # pragma: no cover - cross-attention K/V are written once, at prefill
        raise RuntimeError("cross-attention K/V must be filled at prefill, before rows are split")


class _MergedRowsEncoderDecoderCache(EncoderDecoderCache):
    """The T5 counterpart of `_MergedRowsCache`; an `EncoderDecoderCache` so T5Attention routes self/cross K/V."""

    def __init__(self, cache: EncoderDecoderCache, rows: torch.Tensor, fill):  # noqa: D107 - a view: no super init
        self.self_attention_cache = _MergedRowsCache(cache.self_attention_cache, rows, fill)
        self.cross_attention_cache = _RowsOfLayers(cache.cross_attention_cache, rows)
        self.is_updated = cache.is_updated

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.self_attention_cache.get_seq_length(layer_idx)


def rows_view(cache: Cache, rows: torch.Tensor, fill: tuple[torch.Tensor, torch.Tensor]):
    """What to pass as `past_key_values` to a layer that only `rows` run this step."""
    if isinstance(cache, EncoderDecoderCache):
        return _MergedRowsEncoderDecoderCache(cache, rows, fill)
    return _MergedRowsCache(cache, rows, fill)


def last_kv(cache: Cache, layer_idx: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The newest K/V entry of `rows` at cache slot `layer_idx`: (R, H, 1, hd) each (what `copy` reuses)."""
    layer = self_attention_cache(cache).layers[layer_idx]
    return layer.keys[rows, :, -1:], layer.values[rows, :, -1:]


def append_kv(cache: Cache, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Write a full-batch K/V entry into a slot no layer will run for this step."""
    self_attention_cache(cache).update(keys, values, layer_idx)
