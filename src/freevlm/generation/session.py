"""A decode session: the device state of generate calls (KV caches, static steps and their CUDA graphs), allocated
and captured once per shape and reused by the next call of the same shape.

A generate call on the lean engine allocates its KV cache (every layer's and exit's K/V for every row and column)
and, on the static path, builds its static step and captures its CUDA graphs (`graphs.py`): on a GPU the capture
costs far more than decoding a short answer, and a server answers many short requests. Captured graphs read fixed
addresses, so they can serve a later call only if that call decodes into the very same tensors: the cache, the
per-row position offsets, the RoPE / relative-bias tables, the static step's own buffers. `Buffers` is that state for
one shape; `DecodeSession` keeps a few of them (least recently used first out, `max_entries`) keyed by what fixes the
shape and what the graphs bake in:

- the rows (prompt rows and rows per prompt: beams / returned sequences), the columns rounded up to a multiple of
  `COLUMN_BUCKET` (static steps attend over every column with a mask, so a longer bucket only adds masked columns),
  the weights' dtype and device (and T5's encoder length: its cross-attention K/V have that shape);
- the decode signature: the exits checked or the drafting exit (and draft length, confidence threshold, EOS ids, which
  the speculative rounds' graphs bake in), the skip policy, gated checks, a head subset, the static flag;
- the weights' identity and storage (`tensor_state` of the LM head, the exits' first parameter and classifiers): a
  `.to()` moves every weight (the head's storage shows it), and an in-place update of a head re-gathers a subset
  head's rows (`vocab.py`), so neither ever replays a graph on stale addresses. Objects keyed by identity are held by
  their entry, so an id is never reused under it.

A reused entry is reset to the state of a fresh allocation (zeros, no padding, length 0) before the prefill writes
it, so a call through a session decodes exactly as a call without one over the same columns. The memory of up to
`max_entries` caches stays allocated between calls: `clear()` gives it back; a call refused for memory evicts the
other entries and is checked again. A result that keeps its cache (`keep_cache=True`) takes it out of the session.

`DecodeSession.rows` opens a `RowBatch` over an entry: greedy decoding where a finished row is released and a new
prompt admitted into it between steps (continuous batching), each prompt decoding as it would alone. One batch (or
call) decodes in an entry at a time: a session serves one caller thread.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from freevlm.errors import FreeVLMError
from freevlm.generation.bounds import max_positions
from freevlm.generation.buffers import Buffers
from freevlm.generation.engine import Engine
from freevlm.generation.kernels.common import tensor_state

COLUMN_BUCKET = 64


def bucket_columns(columns: int) -> int:
    """Cache columns for a call needing `columns`: rounded up to a multiple of COLUMN_BUCKET, so calls whose prompt
    and token budget differ a little share one entry."""
    return -(-columns // COLUMN_BUCKET) * COLUMN_BUCKET


class DecodeSession:
    """Buffers (KV caches, static steps, CUDA graphs) kept across generate calls, per shape and decode signature (see
    the module docstring); `EarlyExitVLM.session` is one, and `generate_from_inputs(..., session=...)` takes one."""

    def __init__(self, max_entries: int = 4):
        if max_entries < 1:
            raise ValueError(f"a decode session keeps at least one entry, got max_entries={max_entries}")
        self.max_entries = max_entries
        self.entries: OrderedDict[tuple, Buffers] = OrderedDict()

    def __len__(self) -> int:
        return len(self.entries)

    def buffers(self, key: tuple, max_len: int, pins: tuple = ()) -> tuple[Buffers, bool]:
        """The entry for `key` (most recently used now) and whether it existed; a new one evicts the least recently
        used entry past `max_entries`."""
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
            return entry, True
        entry = Buffers(max_len)
        entry.kept, entry.pins = True, pins
        self.entries[key] = entry
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        return entry, False

    def drop(self, key: tuple) -> None:
        """Forget one entry (its cache was handed to a result, or its call failed midway)."""
        self.entries.pop(key, None)

    def evict_others(self, key: tuple) -> bool:
        """Free every entry but `key`'s (a new call needs their memory); whether there was any."""
        others = [k for k in self.entries if k != key]
        for k in others:
            del self.entries[k]
        if others and torch.cuda.is_available():
            torch.cuda.empty_cache()  # freed blocks back to the device, so the memory check sees them
        return bool(others)

    def rows(self, lm, exits=None, *, rows: int, columns: int, criterion=None, policy=None, check_layers=None,
             head_subset=None, static: bool | None = None, generation_config=None) -> RowBatch:
        """A `RowBatch` of `rows` rows and `columns` cache columns (rounded up to the bucket, within the LM's positions)
        over this session's entry for that shape and signature: prompts admitted and rows released between steps."""
        engine = Engine(lm, exits, criterion, policy, static=static, check_layers=check_layers,
                        head_subset=head_subset)
        device = engine.kernel.head_w.device
        static = static if static is not None else device.type == "cuda"
        limit = max_positions(lm)
        columns = bucket_columns(columns) if limit is None else min(bucket_columns(columns), limit)
        key, pins = _key(engine, ("rows", rows, columns, engine.kernel.dtype, device), static)
        buffers, _ = self.buffers(key, columns, pins)
        try:
            engine.open_rows(rows, buffers, device)
        except FreeVLMError:
            self.drop(key)
            raise
        pad = getattr(generation_config, "pad_token_id", None) if generation_config is not None else None
        pad = lm.config.pad_token_id if pad is None else pad
        return RowBatch(engine, int(pad or 0))

    def clear(self) -> None:
        self.entries.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def decode_key(engine, lm_inputs, expand: int, columns: int, static: bool, draft=None,
               eos_ids: list[int] | None = None) -> tuple[tuple, tuple]:
    """The session key of a call (see the module docstring) and the objects it names by identity."""
    embeds = lm_inputs.inputs_embeds
    shape = (embeds.shape[0], expand, columns, engine.kernel.dtype, embeds.device,
             embeds.shape[1] if engine.lm.is_encoder_decoder else None)
    return _key(engine, shape, static, draft, eos_ids)


def _key(engine, shape: tuple, static: bool, draft=None, eos_ids: list[int] | None = None) -> tuple[tuple, tuple]:
    k = engine.kernel
    exits = engine.exits_owner
    weights = [tensor_state(k.head_w)]
    if exits is not None and engine.exit_list:
        first = next(iter(exits.parameters()), None)
        if first is not None:
            weights.append(tensor_state(first))
        weights += [tensor_state(ex.classifier) for ex in engine.exit_at.values() if ex.classifier is not None]
    subset = engine.head_subset if draft is None else draft.head_subset
    signature = (tuple(engine.exit_list), engine.checking, engine.gated, engine.policy.name, engine.policy.source,
                 id(subset) if subset is not None else None)
    if draft is not None:
        signature += (draft.layer, draft.max_draft, draft.threshold, tuple(eos_ids or ()))
    pins = (k, exits, subset)
    key = (id(k), id(exits) if exits is not None else None, tuple(weights), shape, signature, bool(static))
    return key, pins


class RowBatch:
    """Greedy decoding of up to `rows` prompts side by side over one session entry, rows released and admitted
    between steps: continuous batching, where a server starts a request as soon as a row is free instead of waiting
    for the whole batch to finish.

    Every row writes the same column each step (the static step's shape, so its CUDA graphs serve every step): a prompt
    admitted when the batch is at column L sits in its row's columns L-p..L-1, right-aligned, the columns before it
    masked as left padding is, and its positions count from its own first token, so its tokens are those it gets
    alone (`Engine.admit`). Free rows ride along on the pad token (static shapes; their outputs are ignored), and a
    released row's columns are masked when the row is reused. Columns are used up as the batch decodes: `room` says
    how many are left, and a new batch (a new session entry) starts afresh. The caller decides when a row is done (EOS,
    token budget) and releases it. Decoder-only LMs, propagate / copy policies.
    """

    def __init__(self, engine, pad_token_id: int):
        self.engine = engine
        cache = engine.cache
        self.pad = pad_token_id
        self.tokens = torch.full((cache.batch,), pad_token_id, dtype=torch.long, device=cache.keys.device)
        self.free = list(range(cache.batch))

    @property
    def room(self) -> int:
        """Columns left: steps the batch can still take (a prompt longer than the columns used so far takes more)."""
        return self.engine.cache.max_len - self.engine.cache.length

    def admit(self, lm_inputs) -> tuple[int, int, int]:
        """Prefill one prompt (`lm_inputs` of one row, as `VLMBackbone.prepare` gives it) into a free row: (row, its
        first token, the layer that token left at)."""
        if lm_inputs.inputs_embeds.shape[0] != 1:
            raise FreeVLMError(f"admit takes one prompt at a time, got {lm_inputs.inputs_embeds.shape[0]}")
        if not self.free:
            raise FreeVLMError("no free row: release one first")
        cache = self.engine.cache
        if max(cache.length, lm_inputs.inputs_embeds.shape[1]) >= cache.max_len:
            raise FreeVLMError(f"the batch's {cache.max_len} columns are used up: start a new batch")
        row = self.free.pop(0)
        logits = self.engine.admit(row, lm_inputs)
        token = int(logits.float().argmax(-1))
        self.tokens[row] = token
        return row, token, int(self.engine.log.pop().exit_layer[0])

    def step(self) -> dict[int, tuple[int, int]]:
        """One token for every occupied row: {row: (token, the layer it left at)}."""
        if self.room < 1:
            raise FreeVLMError(f"the batch's {self.engine.cache.max_len} columns are used up: start a new batch")
        logits = self.engine.step(self.tokens)
        nxt = logits.float().argmax(-1)
        self.tokens.copy_(nxt)
        if self.free:
            self.tokens[self.free] = self.pad
        exit_layer = self.engine.log.pop().exit_layer  # the step's log is returned, not kept (a batch runs on)
        busy = [r for r in range(self.tokens.shape[0]) if r not in self.free]
        toks, layers = nxt.tolist(), exit_layer.tolist()
        return {r: (toks[r], layers[r]) for r in busy}

    def release(self, row: int) -> None:
        """The row's prompt is done; the row takes the next admitted prompt."""
        if row in self.free:
            return
        self.free.append(row)
        self.free.sort()
        self.tokens[row] = self.pad

    def close(self) -> None:
        """The batch is over: its entry stays in the session for the next batch of that shape."""
        self.engine.buffers.release()
