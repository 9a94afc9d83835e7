"""Layer-by-layer decoding through the adapters reproduces each VLM's own transformers `generate`."""

from __future__ import annotations

import pytest
import torch

from freevlm.generation.decode import generate_from_inputs
from tests.conftest import tiny_batch


def _generated(backbone, sequences, prompt_len):
    return sequences[:, 1:] if backbone.lm.is_encoder_decoder else sequences[:, prompt_len:]


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_tokens_and_logits_match_hf_generate(any_backbone, tiny_size, batch):
    pixels, ids, mask, extra = tiny_batch(any_backbone.name.removeprefix("tiny-"), tiny_size, batch)
    with torch.no_grad():
        ref = any_backbone.hf_generate(
            pixels, ids, mask, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True,
            **extra,
        )
        ours = generate_from_inputs(
            any_backbone.lm, None, any_backbone.prepare(pixels, ids, mask, **extra), max_new_tokens=6,
            output_logits=True,
        )
    assert torch.equal(_generated(any_backbone, ref.sequences, ids.shape[1]), ours.sequences)
    assert len(ours.records) == len(ref.logits)
    for step_ref, step_ours in zip(ref.logits, ours.logits):
        torch.testing.assert_close(step_ours, step_ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("batch", [1, 3])
def test_beam_search_matches_hf_generate(any_backbone, tiny_size, batch):
    pixels, ids, mask, extra = tiny_batch(any_backbone.name.removeprefix("tiny-"), tiny_size, batch, seed=1)
    with torch.no_grad():
        ref = any_backbone.hf_generate(pixels, ids, mask, max_new_tokens=6, num_beams=3, do_sample=False, **extra)
        ours = generate_from_inputs(
            any_backbone.lm, None, any_backbone.prepare(pixels, ids, mask, **extra), max_new_tokens=6, num_beams=3
        )
    assert torch.equal(_generated(any_backbone, ref, ids.shape[1]), ours.sequences)
