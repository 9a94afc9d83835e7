"""Every generate call is bounded before the static cache is allocated: by the LM's positions (prompt + new tokens +
draft columns) and by a memory budget for the cache (rows = batch x beams). Issue 30: a long prompt ended in an
`IndexError`, `--num-beams 64 --max-new-tokens 100000` in a 39 GB allocation error, and 100k new tokens on a
128-position LM silently sized the cache for 100k positions."""

from __future__ import annotations

import pytest
import torch

from freevlm.backbones.tiny import TinySize, build_tiny
from freevlm.errors import FreeVLMError
from freevlm.exits import ExitSpec, build_exits
from freevlm.generation.bounds import cache_bytes, max_positions
from freevlm.generation.decode import generate_from_inputs
from freevlm.generation.speculative import DraftSettings
from tests.conftest import tiny_batch

SIZE = TinySize(lm_layers=4, max_positions=64)


@pytest.fixture(scope="module")
def opt():
    bb = build_tiny("blip2-opt", SIZE, seed=0)
    return bb, build_exits(bb.lm, ExitSpec("transformer", [2]))


def _inputs(bb, family="blip2-opt", lengths=(5, 3)):
    pixels, ids, mask, extra = tiny_batch(family, SIZE, len(lengths), lengths=lengths)
    return bb.prepare(pixels, ids, mask, **extra)


def _gen(bb, inputs, exits=None, **kwargs):
    return generate_from_inputs(bb.lm, exits, inputs, generation_config=bb.model.generation_config, **kwargs)


def test_prompt_plus_new_tokens_past_the_positions_is_one_line(opt):
    bb, _ = opt
    inputs = _inputs(bb)
    prompt = inputs.inputs_embeds.shape[1]
    room = max_positions(bb.lm) - prompt
    _gen(bb, inputs, max_new_tokens=room)  # exactly fills the positions: fine
    with pytest.raises(FreeVLMError, match=rf"\+ --max-new-tokens {room + 1} = 65 positions exceed the LM's maximum "
                                           rf"of 64 .*lower --max-new-tokens to at most {room}"):
        _gen(bb, inputs, max_new_tokens=room + 1)
    with pytest.raises(FreeVLMError, match="exceed the LM's maximum of 64"):
        _gen(bb, inputs, max_new_tokens=100_000, num_beams=64)


def test_a_prompt_longer_than_the_positions_is_refused_not_an_index_error(opt):
    bb, _ = opt
    inputs = _inputs(bb, lengths=(70, 3))
    with pytest.raises(FreeVLMError, match="the prompt alone leaves no room"):
        _gen(bb, inputs, max_new_tokens=1)


def test_speculative_draft_columns_count(opt):
    bb, exits = opt
    inputs = _inputs(bb)
    room = max_positions(bb.lm) - inputs.inputs_embeds.shape[1]
    draft = DraftSettings(2, 4, None)
    with pytest.raises(FreeVLMError, match=r"\+ 5 draft columns"):
        _gen(bb, inputs, exits, draft=draft, max_new_tokens=room)
    _gen(bb, inputs, exits, draft=draft, max_new_tokens=room - 5)


def test_the_cache_memory_budget_counts_beams(opt):
    bb, _ = opt
    inputs = _inputs(bb)
    _gen(bb, inputs, max_new_tokens=4, num_beams=2, max_cache_gb=1.0)
    with pytest.raises(FreeVLMError, match=r"KV cache would need .* GiB \(8 rows = batch 2 x 4 beams.*--max-cache-gb"):
        _gen(bb, inputs, max_new_tokens=4, num_beams=4, max_cache_gb=1e-6)


def test_t5_has_no_position_limit_but_the_budget_bounds_it():
    bb = build_tiny("blip2-t5", SIZE, seed=0)
    assert max_positions(bb.lm) is None
    inputs = _inputs(bb, "blip2-t5")
    with pytest.raises(FreeVLMError, match="KV cache would need"):
        _gen(bb, inputs, max_new_tokens=100_000, num_beams=64, max_cache_gb=4.0)
    assert _gen(bb, inputs, max_new_tokens=3).sequences.shape[0] == 2


def test_cache_bytes_matches_the_allocated_cache(opt):
    bb, _ = opt
    res = _gen(bb, _inputs(bb), max_new_tokens=3, keep_cache=True)
    cache = res.caches()
    expected = cache_bytes(layers=cache.keys.shape[0], exit_slots=0, rows=cache.batch, kv_heads=cache.keys.shape[2],
                           columns=cache.max_len, head_dim=cache.keys.shape[4], itemsize=cache.keys.element_size())
    allocated = 2 * cache.keys.numel() * cache.keys.element_size() + cache.not_pad.numel()
    assert expected == allocated
    assert torch.is_tensor(res.sequences)
