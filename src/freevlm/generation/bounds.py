"""What one generate call may ask of the model and the machine, checked once before the static cache is allocated.

- Positions: prompt columns + max_new_tokens (+ the speculative draft columns past the last kept token) must fit the
  LM's `max_position_embeddings` (OPT's learned positions index an embedding table: past it, an `IndexError`; Llama's
  RoPE has no table, but the model was not trained past it). T5 (FlanT5) uses relative position buckets and has no
  such limit: its decoder is bounded by the cache memory budget only.
- Memory: the static cache's size (every layer's and exit's K/V for every row, beams and returned sequences
  included, plus T5's cross-attention K/V) must fit a budget: `max_cache_gb` when given, else the memory available
  on the cache's device right now (CUDA: free memory; CPU: MemAvailable). Refusing up front turns an allocation
  error (or a silent multi-GB cache) into one line that names the numbers.
"""

from __future__ import annotations

import os

import torch

from freevlm.errors import FreeVLMError

GiB = 1024**3


def max_positions(lm) -> int | None:
    """The LM's position limit, or None where positions are relative (T5)."""
    if lm.is_encoder_decoder:
        return None
    limit = getattr(lm.config, "max_position_embeddings", None)
    return int(limit) if limit else None


def available_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on `device` (None when unknown)."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # noqa: BLE001 - an unknown budget falls back to no check
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def cache_bytes(*, layers: int, exit_slots: int, rows: int, kv_heads: int, columns: int, head_dim: int,
                itemsize: int, cross_heads: int = 0, encoder_len: int = 0) -> int:
    """The static cache's size: K and V per layer (and exit slot) per row, plus T5's cross-attention K/V."""
    slots = layers + exit_slots
    self_kv = 2 * slots * rows * kv_heads * columns * head_dim * itemsize
    cross_kv = 2 * slots * rows * cross_heads * encoder_len * head_dim * itemsize
    return self_kv + cross_kv + rows * columns  # + the padding mask (bool)


def check_generation_bounds(engine, lm_inputs, max_new_tokens: int, extra_columns: int, expand: int,
                            max_cache_gb: float | None = None, *, positions: bool = True, memory: bool = True,
                            columns: int | None = None) -> None:
    """Refuse (one line, with the numbers) a call whose cache would pass the LM's positions or the memory budget.
    `columns`: the cache's columns when it has more than the call needs (a decode session's length bucket: the extra
    columns are memory, never positions)."""
    embeds = lm_inputs.inputs_embeds
    batch, lm = embeds.shape[0], engine.lm
    prompt = 1 if lm.is_encoder_decoder else embeds.shape[1]
    needed = prompt + max_new_tokens + extra_columns
    limit = max_positions(lm)
    if positions and limit is not None and needed > limit:
        drafts = f" + {extra_columns} draft columns" if extra_columns else ""
        room = limit - prompt - extra_columns
        hint = (f"lower --max-new-tokens to at most {room}" if room >= 1 else
                "the prompt alone leaves no room: shorten it")
        raise FreeVLMError(f"the prompt ({prompt} positions) + --max-new-tokens {max_new_tokens}{drafts} = {needed} "
                           f"positions exceed the LM's maximum of {limit} (max_position_embeddings); {hint}")
    if not memory:
        return
    columns = max(needed, columns or 0)
    k = engine.kernel
    exit_slots = len(engine.exit_list) if engine.uses_exit_cache else 0
    rows = batch * expand
    need = cache_bytes(layers=engine.n, exit_slots=exit_slots, rows=rows, kv_heads=k.kv_heads, columns=columns,
                       head_dim=k.head_dim, itemsize=k.dtype.itemsize,
                       cross_heads=k.heads if lm.is_encoder_decoder else 0,
                       encoder_len=embeds.shape[1] if lm.is_encoder_decoder else 0)
    if max_cache_gb is not None:
        budget, what = int(max_cache_gb * GiB), f"--max-cache-gb {max_cache_gb:g}"
    else:
        budget, what = available_bytes(embeds.device), f"the memory available on {embeds.device.type}"
        if budget is None:
            return
    if need > budget:
        raise FreeVLMError(f"the KV cache would need {need / GiB:.2f} GiB ({rows} rows = batch {batch} x {expand} "
                           f"beams/sequences, {columns} positions, {engine.n + exit_slots} layer slots) but "
                           f"{what} allows {budget / GiB:.2f} GiB; lower --max-new-tokens, --num-beams or "
                           "--batch-size, or raise --max-cache-gb")
