"""The decode session: caches and static steps (CUDA graphs on a GPU; run eagerly here, `static=True`) allocated
once per shape and signature and reused by later calls, which decode exactly as calls without a session."""

from __future__ import annotations

import pytest
import torch

from freevlm.backbones.tiny import TinySize, build_tiny
from freevlm.errors import FreeVLMError
from freevlm.exits import ExitSpec, build_exits
from freevlm.generation.decode import generate_from_inputs
from freevlm.generation.kv import SkipPolicy
from freevlm.generation.session import COLUMN_BUCKET, DecodeSession, bucket_columns
from freevlm.generation.speculative import DraftSettings
from tests.conftest import tiny_batch
from tests.generation.regression_cases import SignRule

SIZE = TinySize(lm_layers=6)
EXIT_LAYERS = [2, 4]
FAMILIES = ["blip2-opt", "blip2-t5", "llava-llama"]
_MODELS: dict = {}


def _models(family):
    if family not in _MODELS:
        bb = build_tiny(family, SIZE, seed=0)
        torch.manual_seed(1)
        _MODELS[family] = (bb, build_exits(bb.lm, ExitSpec("transformer", list(EXIT_LAYERS))))
    return _MODELS[family]


MODES = {
    "early-exit": dict(criterion="sign", policy=SkipPolicy("propagate")),
    "early-exit-copy-beams": dict(criterion="sign", policy=SkipPolicy("copy"), num_beams=3),
    "full": dict(),
    "speculative": dict(draft=DraftSettings(2, 3)),
}


def _gen(family, seed, mode, session=None, batch=3, lengths=(5, 3, 4, 6), **kw):
    bb, exits = _models(family)
    pixels, ids, mask, extra = tiny_batch(family, SIZE, batch, seed=seed, lengths=lengths)
    settings = {"max_new_tokens": 7, **MODES[mode], **kw}
    if settings.pop("criterion", None) == "sign":
        settings["criterion"] = SignRule()
    uses_exits = "criterion" in settings or "draft" in settings
    with torch.no_grad():
        return generate_from_inputs(bb.lm, exits if uses_exits else None, bb.prepare(pixels, ids, mask, **extra),
                                    static=True, generation_config=bb.model.generation_config,
                                    session=session, **settings)


def _same(a, b):
    """The same tokens, exit layers, work records and speculative statistics."""
    assert a.sequences.tolist() == b.sequences.tolist()
    assert a.exit_layers == b.exit_layers and a.trace == b.trace
    assert len(a.records) == len(b.records)
    for x, y in zip(a.records, b.records):
        for name, u in vars(x).items():
            v = getattr(y, name)
            assert (torch.equal(u, v) if torch.is_tensor(u) else u == v), name
    if a.speculative is not None:
        assert a.speculative == b.speculative


def _entry(session):
    (entry,) = session.entries.values()
    return entry


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("family", FAMILIES)
def test_a_session_reuses_its_buffers_and_decodes_as_without_one(family, mode):
    alone = [_gen(family, seed, mode) for seed in (3, 8)]
    session = DecodeSession()
    first = _gen(family, 3, mode, session)
    entry = _entry(session)
    caches = {rows: (c, c.keys.data_ptr(), c.values.data_ptr()) for rows, c in entry.caches.items()}
    steps = (entry.static_step, entry.static_rounds)
    assert any(s is not None for s in steps), "the static path must have run"
    assert first.work.static
    second = _gen(family, 8, mode, session)
    assert _entry(session) is entry, "the same key finds the same entry"
    for rows, (cache, keys, values) in caches.items():  # the very same tensors, reset and rewritten
        assert entry.caches[rows] is cache and cache.keys.data_ptr() == keys and cache.values.data_ptr() == values
    assert (entry.static_step, entry.static_rounds) == steps, "the same static step (its graphs on a GPU)"
    assert all(s is None or s.engine is None for s in steps), "the finished call's engine is not kept"
    _same(first, alone[0])
    _same(second, alone[1])
    assert second.sequences.tolist() != first.sequences.tolist(), "two different inputs (else the test shows little)"


@pytest.mark.parametrize("family", ["blip2-opt", "llava-llama"])
def test_prompts_of_other_lengths_share_a_length_bucket(family):
    """Decoder-only LMs: the columns a call needs are rounded up to the bucket, so a longer prompt (and more new
    tokens) reuses the entry; its extra columns are masked, and the tokens are those of a call without a session."""
    session = DecodeSession()
    first = _gen(family, 3, "early-exit", session)
    entry = _entry(session)
    second = _gen(family, 4, "early-exit", session, lengths=(7, 2, 9), max_new_tokens=9)
    assert _entry(session) is entry and entry.max_len % COLUMN_BUCKET == 0
    _same(second, _gen(family, 4, "early-exit", lengths=(7, 2, 9), max_new_tokens=9))
    _same(first, _gen(family, 3, "early-exit"))


def test_other_keys_get_their_own_entries_and_the_oldest_goes_first():
    session = DecodeSession(max_entries=3)
    calls = [dict(mode="early-exit"), dict(mode="early-exit", batch=1), dict(mode="full"),
             dict(mode="early-exit", policy=SkipPolicy("copy")), dict(mode="early-exit", max_new_tokens=COLUMN_BUCKET)]
    keys = []
    for kw in calls:
        _gen("blip2-opt", 3, session=session, **kw)
        keys.append(list(session.entries)[-1])
    assert len(set(keys)) == len(calls), "batch, signature, policy and length bucket each make a key"
    assert len(session) == 3 and list(session.entries) == keys[-3:]  # least recently used out first
    _gen("blip2-opt", 3, session=session, **calls[2])  # a hit moves its entry to the back
    assert list(session.entries)[-1] == keys[2] and len(session) == 3
    session.clear()
    assert len(session) == 0


def test_the_cache_is_kept_only_when_asked():
    session = DecodeSession()
    res = _gen("blip2-opt", 3, "early-exit", session)
    with pytest.raises(FreeVLMError, match="pass keep_cache=True"):
        res.caches()
    assert len(session) == 1
    kept = _gen("blip2-opt", 3, "early-exit", session, keep_cache=True)
    assert len(session) == 0, "a kept cache leaves the session (a later call must not overwrite it)"
    assert kept.caches().max_len == bucket_columns(kept.caches().max_len)  # the entry's, bucketed
    later = _gen("blip2-opt", 3, "early-exit", session)
    assert _entry(session).caches[3] is not kept.caches()
    _same(later, res)


def test_a_failed_call_leaves_no_entry():
    session = DecodeSession()
    with pytest.raises(FreeVLMError, match="output_logits"):
        _gen("blip2-opt", 3, "speculative", session, output_logits=True)
    assert len(session) == 0


def test_the_api_decodes_in_its_session():
    from PIL import Image

    from tests.generation.test_properties import api_vlm

    vlm = api_vlm("blip2-opt")
    vlm.session.clear()  # the VLM is shared with other tests
    images = [Image.new("RGB", (20, 20), c) for c in ("red", "blue")]
    prompts = ["a photo of", "a"]
    first = vlm.generate(images, prompts, mode="full", max_new_tokens=5, static=True)
    entry = _entry(vlm.session)
    again = vlm.generate(images, prompts, mode="full", max_new_tokens=5, static=True)
    assert _entry(vlm.session) is entry
    assert again.sequences.tolist() == first.sequences.tolist() and again.texts == first.texts


@pytest.mark.parametrize("family", ["blip2-opt", "llava-llama", "qwen2vl-qwen2"])  # Qwen2-VL: per-row M-RoPE offsets
def test_rows_admitted_between_steps_decode_as_they_do_alone(family):
    """Continuous batching: a prompt admitted into a running batch (longer and shorter than the columns used so far,
    into a released row) gets the tokens and exit layers it gets alone."""
    bb, exits = _models(family)
    prompts = []
    for seed, length in ((3, 5), (4, 9), (5, 2), (6, 4)):
        pixels, ids, mask, extra = tiny_batch(family, SIZE, 1, seed=seed, lengths=(length,))
        prompts.append(bb.prepare(pixels, ids, mask, **extra))
    new = 6
    alone = []
    with torch.no_grad():
        for lm_inputs in prompts:
            res = generate_from_inputs(bb.lm, exits, lm_inputs, criterion=SignRule(), static=True, max_new_tokens=new,
                                       eos_token_id=[], generation_config=bb.model.generation_config)
            alone.append((res.sequences[0].tolist(), res.exit_layers[0]))
        session = DecodeSession()
        batch = session.rows(bb.lm, exits, rows=2, columns=48, criterion=SignRule(), static=True,
                             generation_config=bb.model.generation_config)
        got = {}  # prompt -> (tokens, exit layers)
        at = {}  # row -> prompt
        waiting = list(range(len(prompts)))
        steps = 0
        while waiting or at:
            while waiting and batch.free:
                i = waiting.pop(0)
                row, token, layer = batch.admit(prompts[i])
                at[row], got[i] = i, ([token], [layer])
            for row, (token, layer) in batch.step().items():
                got[at[row]][0].append(token)
                got[at[row]][1].append(layer)
            steps += 1
            for row in [r for r, i in at.items() if len(got[i][0]) == new]:
                batch.release(row)
                del at[row]
        batch.close()
    assert steps < len(prompts) * new, "prompts must have shared steps"
    assert [got[i] for i in range(len(prompts))] == alone
    assert any(layer < SIZE.lm_layers for _, layers in alone for layer in layers), "some tokens exit early"
    assert session.entries, "the batch's buffers stay in the session"


def test_a_row_batch_refuses_what_it_cannot_hold():
    bb, exits = _models("blip2-t5")
    with pytest.raises(FreeVLMError, match="decoder-only"):
        DecodeSession().rows(bb.lm, exits, rows=2, columns=32, criterion=SignRule())
    bb, exits = _models("blip2-opt")
    batch = DecodeSession().rows(bb.lm, exits, rows=1, columns=16, criterion=SignRule(),
                                 generation_config=bb.model.generation_config)
    pixels, ids, mask, extra = tiny_batch("blip2-opt", SIZE, 1, seed=3, lengths=(5,))
    lm_inputs = bb.prepare(pixels, ids, mask, **extra)
    with torch.no_grad():
        batch.admit(lm_inputs)
        with pytest.raises(FreeVLMError, match="no free row"):
            batch.admit(lm_inputs)
        with pytest.raises(FreeVLMError, match="used up"):
            for _ in range(batch.room + 1):
                batch.step()
