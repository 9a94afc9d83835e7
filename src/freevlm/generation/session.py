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

"""

from __future__ import annotations

from collections import OrderedDict

import torch

from freevlm.generation.buffers import Buffers
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

