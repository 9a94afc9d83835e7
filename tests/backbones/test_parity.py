"""Decoding on freevlm's engine reproduces each VLM's own transformers `generate`: greedy (tokens and logits), beam
search (length penalty, early stopping, EOS inside beams) and seeded sampling, for every family, batch 1 and
left-padded batches (Qwen2-VL's with images of different sizes, Idefics3/SmolVLM's with different tile counts)."""

from __future__ import annotations

import pytest
import torch

from freevlm.backbones.tiny import EOS_ID, FAMILIES, TinySize, build_tiny
from freevlm.generation.decode import generate_from_inputs
from tests.conftest import make_eos_likely, tiny_batch


def _generated(backbone, sequences, prompt_len):
    return sequences[:, 1:] if backbone.lm.is_encoder_decoder else sequences[:, prompt_len:]


def _rows(sequences, traces=None):
    """Token lists up to and including EOS (transformers pads finished rows; freevlm pads with pad_token_id)."""
    out = []
    for i, row in enumerate(sequences.tolist()):
        n = len(traces[i]) if traces is not None else next((j + 1 for j, t in enumerate(row) if t == EOS_ID), len(row))
        out.append(row[:n])
    return out


def _ours(bb, pixels, ids, mask, extra, **kwargs):
    return generate_from_inputs(bb.lm, None, bb.prepare(pixels, ids, mask, **extra),
                                generation_config=bb.model.generation_config, **kwargs)


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_tokens_and_logits_match_hf_generate(any_backbone, tiny_size, batch):
    pixels, ids, mask, extra = tiny_batch(any_backbone.name.removeprefix("tiny-"), tiny_size, batch)
    with torch.no_grad():
        ref = any_backbone.hf_generate(
            pixels, ids, mask, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True,
            **extra,
        )
        ours = _ours(any_backbone, pixels, ids, mask, extra, max_new_tokens=6, output_logits=True)
    assert torch.equal(_generated(any_backbone, ref.sequences, ids.shape[1]), ours.sequences)
    assert len(ours.logits) == len(ref.logits)
    for step_ref, step_ours in zip(ref.logits, ours.logits):
        torch.testing.assert_close(step_ours, step_ref, atol=1e-5, rtol=0)


@pytest.fixture(scope="module", params=FAMILIES)
def eos_backbone(request):
    size = TinySize()
    bb = build_tiny(request.param, size, seed=0)
    make_eos_likely(bb, request.param, size)
    return request.param, size, bb


@pytest.mark.parametrize("num_beams,length_penalty,early_stopping", [
    (1, 1.0, False), (3, 1.0, False), (3, 0.5, True), (4, 2.0, "never"), (3, -1.0, False),
])
def test_greedy_and_beam_search_with_eos_match_hf_generate(eos_backbone, num_beams, length_penalty, early_stopping):
    family, size, bb = eos_backbone
    kwargs = dict(max_new_tokens=10, num_beams=num_beams, do_sample=False)
    if num_beams > 1:
        kwargs.update(length_penalty=length_penalty, early_stopping=early_stopping)
    ended = 0
    for seed in range(3):
        pixels, ids, mask, extra = tiny_batch(family, size, 3, seed=seed)
        with torch.no_grad():
            ref = bb.hf_generate(pixels, ids, mask, **kwargs, **extra)
            ours = _ours(bb, pixels, ids, mask, extra, **kwargs)
        want = _rows(_generated(bb, ref, ids.shape[1]))
        assert _rows(ours.sequences, ours.trace) == want
        ended += sum(row[-1] == EOS_ID for row in want)
    assert ended, "some sequences should end on EOS for this test to mean anything"


@pytest.mark.parametrize("settings", [dict(temperature=0.7), dict(top_k=5), dict(top_p=0.8),
                                      dict(top_p=0.9, num_return_sequences=4),
                                      dict(temperature=1.3, top_k=10, top_p=0.9)])
def test_seeded_sampling_matches_hf_generate(any_backbone, tiny_size, settings):
    """Same logits warpers (transformers' own), same multinomial draws: the same samples for the same seed."""
    pixels, ids, mask, extra = tiny_batch(any_backbone.name.removeprefix("tiny-"), tiny_size, 3, seed=1)
    with torch.no_grad():
        torch.manual_seed(123)
        ref = any_backbone.hf_generate(pixels, ids, mask, max_new_tokens=8, do_sample=True, **settings, **extra)
        torch.manual_seed(123)
        ours = _ours(any_backbone, pixels, ids, mask, extra, max_new_tokens=8, do_sample=True, **settings)
    assert _rows(ours.sequences, ours.trace) == _rows(_generated(any_backbone, ref, ids.shape[1]))
    assert ours.sequences.shape[0] == 3 * settings.get("num_return_sequences", 1)
