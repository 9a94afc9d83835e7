"""Subset heads: the frequency ranking and its saved form; a subset of the whole vocabulary decodes exactly as no
subset; speculative drafts from small subsets stay lossless on every family; early exit checks and emits on the
subset and is charged K/V of a head."""

from __future__ import annotations

import pytest
import torch

from freevlm.backbones.tiny import EOS_ID
from freevlm.errors import FreeVLMError
from freevlm.eval.efficiency import CostModel, compute_speedup
from freevlm.generation.criteria import Confidence
from freevlm.generation.decode import generate_from_inputs
from freevlm.generation.speculative import DraftSettings
from freevlm.generation.vocab import HeadSubset, load_token_ranking, rank_tokens, save_token_ranking
from tests.conftest import tiny_batch
from tests.generation.regression_cases import SignRule
from tests.generation.test_speculative import EXIT_LAYERS, SIZE, _tokens, setup  # noqa: F401 (the same fixture)


def _run(bb, exits, lm_inputs, **kwargs):
    return generate_from_inputs(bb.lm, exits, lm_inputs, generation_config=bb.model.generation_config, **kwargs)


def test_ranking_orders_by_count_and_subsets_keep_eos(tmp_path):
    ranking = rank_tokens([[5, 5, 7], [7, 5, 9]], vocab_size=12)
    assert ranking[:3].tolist() == [5, 7, 9] and sorted(ranking.tolist()) == list(range(12))  # unseen: by id
    sub = HeadSubset.top(ranking, 3, [2], 12)
    assert sub.ids.tolist() == [2, 5, 7] and sub.fraction == 3 / 12  # EOS takes the last place, ids ascend
    assert HeadSubset.top(ranking, 40, [2], 12).ids.tolist() == list(range(12))
    w = torch.randn(12, 4)
    torch.testing.assert_close(sub.rows(w), w[[2, 5, 7]])
    assert sub.scatter(torch.ones(1, 3))[0].isinf().sum() == 9
    save_token_ranking(tmp_path, ranking)
    assert torch.equal(load_token_ranking(tmp_path, 12), ranking)
    save_token_ranking(tmp_path / "plan-s0", ranking)  # a plan folder not made yet (the demo's planner saves first)
    assert torch.equal(load_token_ranking(tmp_path / "plan-s0", 12), ranking)
    assert load_token_ranking(tmp_path / "none") is None
    with pytest.raises(FreeVLMError, match="vocabulary of 12, not 13"):
        load_token_ranking(tmp_path, 13)
    with pytest.raises(FreeVLMError, match="size must be >= 1"):
        HeadSubset.top(ranking, 0, [2], 12)


def test_a_subset_of_the_whole_vocabulary_is_no_subset(setup):  # noqa: F811
    family, bb, exits = setup
    pixels, ids, mask, extra = tiny_batch(family, SIZE, 3, seed=2)
    lm_inputs = bb.prepare(pixels, ids, mask, **extra)
    everything = HeadSubset(torch.arange(bb.lm.vocab_size), bb.lm.vocab_size)
    with torch.no_grad():
        for kw in (dict(criterion=SignRule()), dict(draft=DraftSettings(1, 4))):
            plain = _run(bb, exits, lm_inputs, max_new_tokens=8, **kw)
            whole = _run(bb, exits, lm_inputs, max_new_tokens=8, head_subset=everything, **kw)
            assert _tokens(whole) == _tokens(plain) and whole.exit_layers == plain.exit_layers
            for a, b in zip(whole.records, plain.records):
                assert torch.equal(a.heads, b.heads) and torch.equal(a.layers, b.layers)


@pytest.mark.parametrize("size", [1, 6, 24])
def test_speculative_drafts_from_a_small_subset_stay_lossless(setup, size):  # noqa: F811
    """The subset is ranked on the model's own outputs for other prompts, so it misses tokens these rows emit (a
    subset of 1 holds EOS only); the verifier's full head supplies them."""
    family, bb, exits = setup
    with torch.no_grad():
        pixels, ids, mask, extra = tiny_batch(family, SIZE, 3, seed=11)
        train = _run(bb, None, bb.prepare(pixels, ids, mask, **extra), max_new_tokens=10)
        ranking = rank_tokens(_tokens(train), bb.lm.vocab_size)
        sub = HeadSubset.top(ranking, size, [EOS_ID], bb.lm.vocab_size)
        missed = False
        for batch, seed, layer in ((1, 2, 1), (3, 5, 3), (3, 2, 5)):
            pixels, ids, mask, extra = tiny_batch(family, SIZE, batch, seed=seed)
            lm_inputs = bb.prepare(pixels, ids, mask, **extra)
            full = _run(bb, None, lm_inputs, max_new_tokens=11)
            spec = _run(bb, exits, lm_inputs, draft=DraftSettings(layer, 4), max_new_tokens=11, head_subset=sub)
            assert _tokens(spec) == _tokens(full)
            missed |= any(t not in sub.ids.tolist() for row in _tokens(full) for t in row)
            assert all(e.head_share == sub.fraction for e in spec.log[1:])  # a draft head: K/V of a head
    assert missed, "the subset should miss some token the model emits"


def test_early_exit_checks_and_emits_on_the_subset_and_is_charged_for_it(setup):  # noqa: F811
    family, bb, exits = setup
    v = bb.lm.vocab_size
    sub = HeadSubset(torch.arange(0, v, 3), v)

    class Recording(Confidence):
        def __call__(self, state, rows, logits, hidden, prev):
            assert logits.shape[-1] == sub.size  # the criterion sees the subset's logits only
            return super().__call__(state, rows, logits, hidden, prev)

    pixels, ids, mask, extra = tiny_batch(family, SIZE, 3, seed=2)
    lm_inputs = bb.prepare(pixels, ids, mask, **extra)
    with torch.no_grad():
        res = _run(bb, exits, lm_inputs, criterion=Recording(0.05), head_subset=sub, max_new_tokens=8)
        plain = _run(bb, exits, lm_inputs, criterion=Confidence(0.05), max_new_tokens=8)
    exited = [(t, layer) for row, layers in zip(_tokens(res), res.exit_layers) for t, layer in zip(row, layers)
              if layer < SIZE.lm_layers]
    assert exited and all(t in sub.ids.tolist() for t, _ in exited)  # a fired exit emits the subset's argmax
    # heads: one full head per token reaching the final layer, K/V of one per check
    rec = res.records[1]
    checked = torch.searchsorted(torch.tensor(EXIT_LAYERS), rec.exit_layer, right=True).float()
    torch.testing.assert_close(rec.heads, checked * sub.fraction + (rec.exit_layer == SIZE.lm_layers).float())
    cost = CostModel.from_modules(bb.lm, exits)
    live = [torch.arange(3)] * len(res.records)
    if _tokens(res) == _tokens(plain) and res.exit_layers == plain.exit_layers:
        assert compute_speedup(res.records, live, cost) > compute_speedup(plain.records, live, cost)


def test_api_head_subset_option():
    from PIL import Image

    from tests.generation.test_properties import api_vlm

    vlm = api_vlm("blip2-opt")
    images = [Image.new("RGB", (20, 20), c) for c in ("red", "blue")]
    prompts = ["a photo of", "a"]
    with pytest.raises(FreeVLMError, match="needs a token ranking"):
        vlm.generate(images, prompts, mode="speculative", head_subset=8, max_new_tokens=4)
    v = vlm.backbone.lm.vocab_size
    vlm.token_ranking = torch.randperm(v, generator=torch.Generator().manual_seed(0))
    try:
        full = vlm.generate(images, prompts, mode="full", max_new_tokens=6)
        spec = vlm.generate(images, prompts, mode="speculative", draft_layer=1, head_subset=8, max_new_tokens=6)
        ee = vlm.generate(images, prompts, threshold=0.05, head_subset=8, max_new_tokens=6)
    finally:
        vlm.token_ranking = None
    assert spec.sequences.tolist() == full.sequences.tolist()
    assert all(e.head_share == 8 / v for e in spec.log[1:])
    assert ee.work.head_subset.size == 8


@pytest.mark.parametrize("policy", ["propagate", "copy"])
def test_the_static_step_checks_subsets_as_the_dynamic_engine(setup, policy):  # noqa: F811
    """Subset checks run in the static (CUDA-graph) step too: same tokens, exit layers and work as the dynamic one."""
    from freevlm.generation.kv import SkipPolicy

    family, bb, exits = setup
    v = bb.lm.vocab_size
    sub = HeadSubset(torch.arange(0, v, 2), v)
    pixels, ids, mask, extra = tiny_batch(family, SIZE, 3, seed=4)
    lm_inputs = bb.prepare(pixels, ids, mask, **extra)
    runs = {}
    with torch.no_grad():
        for static in (False, True):
            runs[static] = _run(bb, exits, lm_inputs, criterion=SignRule(), policy=SkipPolicy(policy),
                                head_subset=sub, static=static, max_new_tokens=9, min_new_tokens=3)
    # min_new_tokens: a model made to like EOS can end every row at its first token, before any decode step
    assert runs[True].work.static, "the static step must have run"
    assert _tokens(runs[True]) == _tokens(runs[False])
    assert runs[True].exit_layers == runs[False].exit_layers
    assert any(layer < SIZE.lm_layers for row in runs[True].exit_layers for layer in row)
    for a, b in zip(runs[True].records, runs[False].records):
        assert torch.equal(a.heads, b.heads) and torch.equal(a.layers, b.layers)
