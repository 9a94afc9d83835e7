"""The static KV cache of the decode engine, and where a group of query tokens sits in it (`Span`).

One preallocated tensor pair holds every backbone layer's keys and values, `(N, B, H_kv, T, hd)`, and another every
exit transformer's, `(E, B, H_kv, T, hd)`; `keys[l]` is layer l+1's slot (a view, never a copy). Token t of row b
lives in column t of every layer. Columns are shared by the backbone and the exits, so one mask serves both.

- Prompt padding: left-padded prompts keep their padding columns; `not_pad` (B, T) says which columns hold real
  tokens, and attention never reads the others (a query always sees itself, so padding columns stay finite).
- Per-row lengths: `lengths[b]` is the number of columns row b has used. When every row has the same length (plain
  decoding), `length` holds it as a Python int and writes are slices (the fast path); speculative decoding lets rows
  drift apart, and then writes scatter per row. Rolling back = lowering a length: columns at or past a row's length
  are never attended to (the causal mask stops every query at its own column), and are overwritten when reused.
- T5: the decoder's cross-attention K/V over the encoder output are computed once per layer (and exit) at prefill.

Written by hand (not transformers' `StaticCache`) because the engine needs rows to advance by different amounts,
rollback, stacked layers (so that filling all skipped layers of a token is one write) and exit slots beside the
backbone's; transformers' cache classes provide none of these.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class KVCache:
    keys: torch.Tensor  # (N, B, H_kv, T, hd) backbone layers
    values: torch.Tensor
    exit_keys: torch.Tensor | None  # (E, B, H_kv, T, hd) exit transformers, or None
    exit_values: torch.Tensor | None
    not_pad: torch.Tensor  # (B, T) bool: column holds a real token (prompt padding: False)
    lengths: torch.Tensor  # (B,) long: columns in use per row
    length: int | None  # the common length when all rows agree, else None
    has_pad: bool  # any padding column at all (else masks can be skipped for single-token steps)
    cross_keys: torch.Tensor | None = None  # T5: (N, B, H, S, hd) cross-attention K/V over the encoder output
    cross_values: torch.Tensor | None = None
    exit_cross_keys: torch.Tensor | None = None  # T5 exits: (E, B, H, S, hd)
    exit_cross_values: torch.Tensor | None = None
    encoder_bias: torch.Tensor | None = None  # T5: (B, 1, 1, S) additive mask over encoder positions

    @classmethod
    def allocate(cls, num_layers: int, num_exits: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> KVCache:
        # zeros, not empty: attention multiplies masked columns' values by a zero weight, and 0 * NaN is NaN
        shape = (batch, kv_heads, max_len, head_dim)
        keys = torch.zeros((num_layers, *shape), dtype=dtype, device=device)
        values = torch.zeros_like(keys)
        ek = torch.zeros((num_exits, *shape), dtype=dtype, device=device) if num_exits else None
        ev = torch.zeros_like(ek) if num_exits else None
        return cls(keys, values, ek, ev, torch.ones(batch, max_len, dtype=torch.bool, device=device),
                   torch.zeros(batch, dtype=torch.long, device=device), 0, False)

    def reset(self) -> None:
        """Back to the state of a fresh allocation (zeros, no padding, length 0), in place: a session reuses the cache
        for the next call, and captured CUDA graphs read these very tensors. T5's cross-attention K/V and encoder mask
        are rewritten by the prefill."""
        for t in (self.keys, self.values, self.exit_keys, self.exit_values):
            if t is not None:
                t.zero_()
        self.not_pad.fill_(True)
        self.lengths = torch.zeros_like(self.lengths)
        self.length, self.has_pad = 0, False

    def put(self, name: str, value: torch.Tensor) -> None:
        """Set a per-call tensor field (T5's cross-attention K/V, encoder mask): copied into the one already there
        when it has the same shape (a reused cache keeps its addresses), else set."""
        held = getattr(self, name)
        if held is not None and held.shape == value.shape and held.dtype == value.dtype:
            held.copy_(value)
        else:
            setattr(self, name, value)

    def gather(self, index: torch.Tensor, into: KVCache | None = None) -> KVCache:
        """A cache whose row i is this one's row index[i] (a prompt expanded to several beams or samples): written
        into `into`'s tensors when given (a session's, whose addresses captured graphs read), else new tensors."""
        out = into if into is not None else replace(self)
        for name, dim in _ROW_DIMS:
            src = getattr(self, name)
            if src is None:
                setattr(out, name, None)
                continue
            held = getattr(out, name) if into is not None else None
            shape = (*src.shape[:dim], index.shape[0], *src.shape[dim + 1 :])
            if held is not None and held.shape == shape and held.dtype == src.dtype:
                torch.index_select(src, dim, index, out=held)
            else:
                setattr(out, name, src.index_select(dim, index))
        out.lengths = self.lengths.index_select(0, index)
        out.length, out.has_pad = self.length, self.has_pad
        return out

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    @property
    def batch(self) -> int:
        return self.keys.shape[1]

    def advance(self, q: int) -> None:
        """Every row has written q more columns (aligned decoding)."""
        self.lengths += q
        if self.length is not None:
            self.length += q

    def set_lengths(self, lengths: torch.Tensor) -> None:
        """Per-row lengths (speculative decoding's accept / rollback)."""
        self.lengths = lengths
        first = int(lengths[0])
        self.length = first if bool((lengths == first).all()) else None

    def reorder(self, index: torch.Tensor, in_place: bool = False) -> None:
        """Rows follow `index` (beam search, or expanding a prompt to several beams/samples). `in_place` keeps every
        tensor where it is (captured CUDA graphs read these addresses); it needs as many rows as before."""
        def move(t, dim):
            if t is None:
                return None
            moved = t.index_select(dim, index)
            return t.copy_(moved) if in_place else moved

        for name in ("keys", "values", "exit_keys", "exit_values", "cross_keys", "cross_values", "exit_cross_keys",
                     "exit_cross_values"):
            setattr(self, name, move(getattr(self, name), 1))
        self.not_pad = move(self.not_pad, 0)
        self.lengths = move(self.lengths, 0)
        self.encoder_bias = move(self.encoder_bias, 0)


# the tensors that hold one entry per batch row, and their row dimension
_ROW_DIMS = (("keys", 1), ("values", 1), ("exit_keys", 1), ("exit_values", 1), ("cross_keys", 1), ("cross_values", 1),
             ("exit_cross_keys", 1), ("exit_cross_values", 1), ("not_pad", 0), ("encoder_bias", 0))


@dataclass
class Span:
    """Where q new tokens per row sit: the columns they are written to and attend from, with everything derived from
    that (mask, positions, RoPE, T5 bias), built once and shared by every layer that processes those tokens."""

    start: int | None  # first column when all rows write the same columns, else None (see `cols`)
    q: int  # query tokens per row
    kv_len: int  # columns attended over (0..kv_len-1)
    cols: torch.Tensor  # (B, q) column of each query token
    positions: torch.Tensor  # (B, q) position ids (OPT learned positions, RoPE, T5 relative positions)
    mask: torch.Tensor | None  # (B, 1, q, kv_len) bool or None = every column < kv_len (single aligned token)
    rows: torch.Tensor | None = None  # the batch rows this span covers (None: all rows, in order)
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # Llama: (cos, sin), (B, q, hd)
    bias: torch.Tensor | None = None  # T5: additive (B|1, H, q, kv_len) relative bias + mask
    cross_bias: torch.Tensor | None = None  # T5: (B, 1, 1, S) encoder mask (additive)
    index: torch.Tensor | None = None  # static step: (1,) device tensor of the column every row writes (CUDA graphs)

    def select(self, keep: torch.Tensor) -> Span:
        """The same span for a subset of its rows (`keep`: indices into this span's rows)."""
        rows = keep if self.rows is None else self.rows[keep]

        def pick(t):
            return t if t is None or t.shape[0] == 1 else t[keep]  # batch-1 tensors broadcast

        return replace(
            self, rows=rows, cols=self.cols[keep], positions=self.positions[keep], mask=pick(self.mask),
            rope=None if self.rope is None else (self.rope[0][keep], self.rope[1][keep]), bias=pick(self.bias),
            cross_bias=pick(self.cross_bias),
        )


def make_span(cache: KVCache, q: int, positions: torch.Tensor, start: int | None = None,
              cols: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> Span:
    """The span of q new tokens per row: at columns start..start+q-1 for every row, or at per-row `cols` (R, q).
    `rows`: the batch rows the span covers (default: all, in order); `positions` (R, q) are theirs."""
    device = cache.keys.device
    not_pad = cache.not_pad if rows is None else cache.not_pad[rows]
    n_rows = not_pad.shape[0]
    if start is not None:
        kv_len = start + q
        col_range = torch.arange(start, kv_len, device=device)
        cols = col_range.expand(n_rows, q)
        if q == 1 and not cache.has_pad:
            return Span(start, q, kv_len, cols, positions, None, rows)
        j = torch.arange(kv_len, device=device)
        causal = j[None, :] <= col_range[:, None]  # (q, kv_len)
        allowed = causal[None] & (not_pad[:, None, :kv_len] | (j == col_range[:, None])[None])
        return Span(start, q, kv_len, cols, positions, allowed[:, None], rows)
    kv_len = int(cols.max()) + 1
    j = torch.arange(kv_len, device=device)
    own = j[None, None, :] == cols[:, :, None]  # (R, q, kv_len)
    allowed = (j[None, None, :] <= cols[:, :, None]) & (not_pad[:, None, :kv_len] | own)
    return Span(None, q, kv_len, cols, positions, allowed[:, None], rows)


def write_kv(cache_k: torch.Tensor, cache_v: torch.Tensor, k: torch.Tensor, v: torch.Tensor, span: Span) -> None:
    """Write new K/V (R, H, q, hd) of the span's rows into one layer's slot (B, H, T, hd)."""
    if span.index is not None:  # the static step: every row, one column given on the device
        cache_k.index_copy_(2, span.index, k)
        cache_v.index_copy_(2, span.index, v)
        return
    if span.start is not None:
        end = span.start + span.q
        if span.rows is None:
            cache_k[:, :, span.start:end] = k
            cache_v[:, :, span.start:end] = v
        else:
            cache_k[span.rows, :, span.start:end] = k
            cache_v[span.rows, :, span.start:end] = v
        return
    rows = torch.arange(cache_k.shape[0], device=k.device) if span.rows is None else span.rows
    r = rows[:, None].expand_as(span.cols)
    cache_k[r, :, span.cols] = k.transpose(1, 2)  # indexing puts (R, q) first: (R, q, H, hd)
    cache_v[r, :, span.cols] = v.transpose(1, 2)


def read_kv(cache_k: torch.Tensor, cache_v: torch.Tensor, span: Span) -> tuple[torch.Tensor, torch.Tensor]:
    """The span's rows' keys and values over columns 0..kv_len-1."""
    if span.rows is None:
        return cache_k[:, :, : span.kv_len], cache_v[:, :, : span.kv_len]
    return cache_k[span.rows, :, : span.kv_len], cache_v[span.rows, :, : span.kv_len]


def self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                   span: Span, scale: float, additive: torch.Tensor | None = None) -> torch.Tensor:
    """Write this layer's new K/V, then attend from the span's queries. q (R, H, q, hd) -> (R, H, q, hd)."""
    write_kv(cache_k, cache_v, k, v, span)
    keys, values = read_kv(cache_k, cache_v, span)
    mask = span.mask if additive is None else additive
    return torch.nn.functional.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask, scale=scale, enable_gqa=keys.shape[1] != q.shape[1]
    )
