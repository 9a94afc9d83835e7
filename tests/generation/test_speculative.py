"""Speculative decoding with an exit as drafter: lossless greedy for every family, draft setting and batch, the exit
cache consistent with what was kept, and sampling with the plain-sampling distribution."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from freevlm.backbones.common import image_rows
from freevlm.backbones.tiny import EOS_ID, FAMILIES, TinySize, build_tiny
from freevlm.errors import FreeVLMError
from freevlm.exits import ExitSpec, build_exits
from freevlm.generation.decode import generate_from_inputs
from freevlm.generation.graphs import StaticSpeculative
from freevlm.generation.speculative import DraftSettings
from tests.conftest import make_eos_likely, pads_left, tiny_batch

SIZE = TinySize(lm_layers=6)
EXIT_LAYERS = [1, 3, 5]  # exit 5 is seeded from layer 6 (seed "next"): a perfect drafter, every draft kept


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request):
    bb = build_tiny(request.param, SIZE, seed=0)
    make_eos_likely(bb, request.param, SIZE)
    torch.manual_seed(0)
    return request.param, bb, build_exits(bb.lm, ExitSpec("transformer", list(EXIT_LAYERS)))


def _tokens(res):
    return [res.sequences[i, : len(t)].tolist() for i, t in enumerate(res.trace)]


def _run(bb, exits, lm_inputs, draft=None, **kwargs):
    return generate_from_inputs(bb.lm, exits if draft else None, lm_inputs, draft=draft,
                                generation_config=bb.model.generation_config, **kwargs)


@pytest.mark.parametrize("draft", [(1, 1, None), (1, 8, None), (3, 3, None), (5, 8, None), (1, 8, 0.3),
                                   (1, 8, None, True), (3, 4, 0.3, True)],
                         ids=["e1-k1", "e1-k8", "e3-k3", "e5-k8-perfect", "e1-adaptive", "e1-k8-pace", "e3-k4-both"])
def test_greedy_output_equals_full_depth(setup, draft):
    family, bb, exits = setup
    for batch, seed in ((1, 2), (3, 2), (3, 5)):
        pixels, ids, mask, extra = tiny_batch(family, SIZE, batch, seed=seed)
        lm_inputs = bb.prepare(pixels, ids, mask, **extra)
        with torch.no_grad():
            full = _run(bb, exits, lm_inputs, max_new_tokens=11)
            spec = _run(bb, exits, lm_inputs, DraftSettings(*draft), max_new_tokens=11)
        assert _tokens(spec) == _tokens(full)
        assert all(layer == SIZE.lm_layers for seq in spec.exit_layers for layer in seq)


@pytest.mark.parametrize("draft", [(1, 3, None), (3, 4, 0.3, True), (5, 8, None)],
                         ids=["e1-k3", "e3-k4-adaptive-pace", "e5-k8-perfect"])
def test_graph_shaped_rounds_equal_the_trimmed_eager_rounds(setup, draft, monkeypatch):
    """A round as a GPU graphs it (every row makes all L + 1 feeds, what it may really draft masked on the device)
    and as it runs eagerly on a CPU (feeding stops once no row needs the next feed; the block verified is only what
    was fed): the same tokens, statistics, work log and cache lengths, per row, with rows drifting apart, EOS inside
    blocks and the token budget mid-block."""
    family, bb, exits = setup
    for batch, seed in ((1, 2), (3, 5)):
        pixels, ids, mask, extra = tiny_batch(family, SIZE, batch, seed=seed)
        lm_inputs = bb.prepare(pixels, ids, mask, **extra)
        runs = {}
        for trim in (True, False):
            monkeypatch.setattr(StaticSpeculative, "trim", trim)
            with torch.no_grad():
                runs[trim] = _run(bb, exits, lm_inputs, DraftSettings(*draft), max_new_tokens=11, static=True,
                                  keep_cache=True)
        with torch.no_grad():
            full = _run(bb, exits, lm_inputs, max_new_tokens=11)
        trimmed, graphed = runs[True], runs[False]
        assert _tokens(graphed) == _tokens(trimmed) == _tokens(full)
        assert graphed.speculative.to_json(SIZE.lm_layers) == trimmed.speculative.to_json(SIZE.lm_layers)
        assert graphed.speculative.per_round == trimmed.speculative.per_round
        for a, b in zip(graphed.records, trimmed.records):
            for name in ("layers", "exit_layers", "heads", "tokens"):
                x, y = getattr(a, name), getattr(b, name)
                assert (x is None and y is None) or torch.equal(x, y), name
        assert torch.equal(graphed.caches().lengths, trimmed.caches().lengths)


def _mid_sequence_token(rows):
    """A token that some row first produces at position >= 2 (and no row starts with): an EOS that ends a row inside
    a draft block. Random tiny models repeat themselves, so the model's own EOS rarely does that."""
    first = {r[0] for r in rows}
    for row in rows:
        for t in row[2:]:
            if t not in first and t not in row[:2]:
                return t
    return None


def test_eos_inside_a_block_and_max_new_tokens_mid_block(setup):
    family, bb, exits = setup
    ended = cut = 0
    for seed in range(6):
        pixels, ids, mask, extra = tiny_batch(family, SIZE, 3, seed=seed)
        lm_inputs = bb.prepare(pixels, ids, mask, **extra)
        with torch.no_grad():
            eos = _mid_sequence_token(_tokens(_run(bb, exits, lm_inputs, max_new_tokens=9, eos_token_id=[])))
        # 8 perfect drafts per round: an EOS at position >= 2, or a limit of 5 tokens, falls inside a block
        for kw in (dict(max_new_tokens=9, eos_token_id=[eos if eos is not None else EOS_ID]),
                   dict(max_new_tokens=5, eos_token_id=[])):
            with torch.no_grad():
                full = _run(bb, exits, lm_inputs, **kw)
                spec = _run(bb, exits, lm_inputs, DraftSettings(5, 8), **kw)
            assert _tokens(spec) == _tokens(full)
            ended += sum(row[-1] in kw["eos_token_id"] and len(row) > 2 for row in _tokens(full))
            cut += sum(len(row) == kw["max_new_tokens"] and not kw["eos_token_id"] for row in _tokens(full))
    assert ended and cut, "both stopping paths should occur for this test to mean anything"


def test_drafting_stops_at_a_drafted_eos(setup):
    """A perfect drafter (exit 5) keeps every draft: a row drafts exactly the tokens it emits, so it drafts nothing
    past its EOS and every accepted draft is emitted. Before the fix every row drafted a full block past its EOS,
    and those drafts were verified and counted as accepted."""
    family, bb, exits = setup
    ended = 0
    for seed in range(6):
        pixels, ids, mask, extra = tiny_batch(family, SIZE, 3, seed=seed)
        lm_inputs = bb.prepare(pixels, ids, mask, **extra)
        with torch.no_grad():
            eos = _mid_sequence_token(_tokens(_run(bb, exits, lm_inputs, max_new_tokens=9, eos_token_id=[])))
            kw = dict(max_new_tokens=9, eos_token_id=[eos if eos is not None else EOS_ID])
            full = _run(bb, exits, lm_inputs, **kw)
            spec = _run(bb, exits, lm_inputs, DraftSettings(5, 8), **kw)
        rows = _tokens(full)
        assert _tokens(spec) == rows
        st = spec.speculative
        after_first = sum(len(row) - 1 for row in rows)  # tokens the rounds emitted (the prefill gave the first)
        assert st.tokens == after_first
        # one round per row: its drafts are its tokens up to its EOS, but at most 7 (the verifier adds the 9th)
        drafts = sum(min(len(row) - 1, 7) for row in rows)
        assert st.drafted == st.accepted == drafts, (st.drafted, st.accepted, rows)
        ended += sum(row[-1] in kw["eos_token_id"] and len(row) > 1 for row in rows)
    assert ended, "some row must end at an EOS inside a draft block"


def test_adaptive_draft_length_follows_acceptance(setup):
    """With `adapt_length`, a poor drafter's rows draft fewer tokens per round than max_draft; a perfect drafter's
    rows keep the full length. The output stays full depth's (checked above)."""
    family, bb, exits = setup
    pixels, ids, mask, extra = tiny_batch(family, SIZE, 3, seed=2)
    lm_inputs = bb.prepare(pixels, ids, mask, **extra)
    kw = dict(max_new_tokens=12, eos_token_id=[])
    with torch.no_grad():
        fixed = _run(bb, exits, lm_inputs, DraftSettings(1, 6), **kw)
        paced = _run(bb, exits, lm_inputs, DraftSettings(1, 6, adapt_length=True), **kw)
        perfect = _run(bb, exits, lm_inputs, DraftSettings(5, 4, adapt_length=True), **kw)
    assert _tokens(paced) == _tokens(fixed)
    if fixed.speculative.acceptance_rate < 0.8:
        per_round = [r.speculative.drafted / r.speculative.rounds for r in (paced, fixed)]
        assert per_round[0] < per_round[1]
        assert paced.speculative.acceptance_rate >= fixed.speculative.acceptance_rate
    assert perfect.speculative.acceptance_rate == 1.0
    assert all(e.drafts[e.live].tolist() == [4] * 3 for e in perfect.log[1:-1])  # the last round: room left


def test_batched_rows_accept_different_counts_and_equal_row_by_row(setup):
    family, bb, exits = setup
    diverged = False
    for layer, seed in ((3, 7), (1, 7), (1, 0), (3, 6)):
        pixels, ids, mask, extra = tiny_batch(family, SIZE, 3, seed=seed)
        with torch.no_grad():
            batched = _run(bb, exits, bb.prepare(pixels, ids, mask, **extra), DraftSettings(layer, 4),
                           max_new_tokens=10, eos_token_id=[])
            for r in range(3):
                # LLaVA pads on the far left (strip it); the BLIP-2 layouts pad between image and text, where a T5
                # encoder's relative positions see the padding, so the single row keeps it
                keep = mask[r].bool() if pads_left(family) else torch.ones_like(mask[r]).bool()
                row_pixels, row_extra = image_rows(pixels, extra, [r])
                single = _run(bb, exits, bb.prepare(row_pixels, ids[r : r + 1, keep], mask[r : r + 1, keep],
                                                    **row_extra), DraftSettings(layer, 4), max_new_tokens=10,
                              eos_token_id=[])
                assert _tokens(single)[0] == _tokens(batched)[r]
        per_round = [set(entry.tokens[entry.live].tolist()) for entry in batched.log[1:]]
        diverged |= any(len(counts) > 1 for counts in per_round)
    assert diverged, "rows should keep different numbers of tokens in some round"


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_exit_cache_holds_the_kept_tokens_exit_kv(static):
    """After decoding, the drafting exit's cache equals the exit transformer run over the full-depth h_e of every
    kept token (rejected drafts' columns are past the row's length and not compared)."""
    bb = build_tiny("blip2-opt", SIZE, seed=0)
    exits = build_exits(bb.lm, ExitSpec("transformer", list(EXIT_LAYERS)))
    pixels, ids, mask, extra = tiny_batch("blip2-opt", SIZE, 2, seed=3)
    lm_inputs = bb.prepare(pixels, ids, mask, **extra)
    with torch.no_grad():
        for layer in (1, 5):  # some drafts rejected / all drafts kept
            res = _run(bb, exits, lm_inputs, DraftSettings(layer, 3), max_new_tokens=9, static=static,
                       keep_cache=True)
            cache = res.caches()
            lm = bb.lm
            tokens = res.sequences
            emb = torch.cat([lm_inputs.inputs_embeds, lm.embed_tokens(tokens[:, :-1])], 1)
            full_mask = torch.cat([lm_inputs.attention_mask, torch.ones_like(tokens[:, :-1])], 1)
            h = lm.embed(None, emb, None, full_mask, 0)
            ctx = lm.context(h, full_mask, None, 0, None)
            for i in range(layer):
                h = lm.run_layer(lm.layers[i], h, ctx, None)
            from transformers import DynamicCache

            own = DynamicCache()
            exits.at(layer).state(lm, h, ctx, own)
            slot = exits.layers.index(layer)
            width = h.shape[1]
            for r in range(2):
                kept = int(cache.lengths[r])  # the row's columns, up to its last kept token
                real = full_mask[r].bool()[:kept]
                ours = cache.exit_keys[0][r, :, :kept][:, real]
                want = own.layers[slot].keys[r, :, :kept][:, real]
                assert kept <= width
                torch.testing.assert_close(ours, want, atol=1e-5, rtol=0)


def _chi_square_p(a: Counter, b: Counter) -> float:
    """p-value of a chi-square test that two equal-size samples come from one distribution (rare bins pooled)."""
    keys = sorted(set(a) | set(b), key=lambda k: -(a[k] + b[k]))
    rows, rest = [], [0, 0]
    for k in keys:
        if a[k] + b[k] >= 10:
            rows.append((a[k], b[k]))
        else:
            rest[0] += a[k]
            rest[1] += b[k]
    if sum(rest):
        rows.append(tuple(rest))
    stat = 0.0
    for x, y in rows:
        e = (x + y) / 2
        stat += (x - e) ** 2 / e + (y - e) ** 2 / e
    df = len(rows) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2), torch.tensor(stat / 2)))


@pytest.mark.parametrize("subset", [False, True], ids=["full-head", "subset-head"])
def test_speculative_sampling_has_the_distribution_of_plain_sampling(subset):
    """With a subset head the draft distribution is zero outside the subset; the acceptance rule still gives the
    full model's distribution."""
    from freevlm.generation.vocab import HeadSubset

    bb = build_tiny("blip2-opt", TinySize(lm_layers=4), seed=0)
    exits = build_exits(bb.lm, ExitSpec("transformer", [1]))
    pixels, ids, mask, extra = tiny_batch("blip2-opt", TinySize(lm_layers=4), 1, seed=2)
    lm_inputs = bb.prepare(pixels, ids, mask, **extra)
    n = 3000
    kw = dict(max_new_tokens=3, do_sample=True, top_k=4, num_return_sequences=n)
    from freevlm.generation.criteria import Confidence

    with torch.no_grad():
        torch.manual_seed(0)
        plain = _run(bb, exits, lm_inputs, **kw)
        torch.manual_seed(1)
        v = bb.lm.vocab_size
        sub = HeadSubset(torch.arange(0, v, 2), v) if subset else None
        spec = _run(bb, exits, lm_inputs, DraftSettings(1, 2, head_subset=sub), **kw)
        torch.manual_seed(2)  # control: sampling from the drafter itself (every token leaves at exit 1)
        drafter = generate_from_inputs(bb.lm, exits, lm_inputs, criterion=Confidence(1e-6),
                                       generation_config=bb.model.generation_config, **kw)
    assert (0.1 if subset else 0.3) < spec.speculative.acceptance_rate < 0.99, "the drafter must differ from the model"

    def dist(res, upto):
        return Counter(tuple(r[1 : upto + 1]) for r in res.sequences.tolist())  # tokens after the prefill's

    for upto in (1, 2):  # the 2nd token alone, the 2nd and 3rd jointly
        assert _chi_square_p(dist(plain, upto), dist(spec, upto)) > 1e-3
    assert _chi_square_p(dist(plain, 2), dist(drafter, 2)) < 1e-3, "the test must be able to tell distributions apart"


def test_bad_speculative_settings_fail_with_one_line():
    bb = build_tiny("blip2-opt", SIZE, seed=0)
    exits = build_exits(bb.lm, ExitSpec("transformer", list(EXIT_LAYERS)))
    pixels, ids, mask, extra = tiny_batch("blip2-opt", SIZE, 1)
    lm_inputs = bb.prepare(pixels, ids, mask, **extra)
    with pytest.raises(FreeVLMError, match="draft exit layer 2 is not one of the exits"):
        _run(bb, exits, lm_inputs, DraftSettings(2, 4))
    with pytest.raises(FreeVLMError, match="num_beams must be 1"):
        _run(bb, exits, lm_inputs, DraftSettings(1, 4), num_beams=3)
    with pytest.raises(FreeVLMError, match="draft length must be >= 1"):
        DraftSettings(1, 0)
