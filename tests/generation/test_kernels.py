"""Every family's kernel against transformers' own forward: logits within 1e-5 (fp32), prefill and decode, left-padded.

The reference is the transformers LM called on the whole sequence so far (no cache at all), so both the kernels'
arithmetic and the static cache's bookkeeping (columns, padding, positions, T5's bias) are checked.
"""

from __future__ import annotations

import pytest
import torch

from freevlm.backbones.tiny import FAMILIES, TinySize, build_tiny
from freevlm.generation.engine import Engine
from tests.conftest import tiny_batch

SIZE = TinySize(lm_layers=3)


def _reference_logits(bb, lm_inputs, tokens: torch.Tensor, pixels=None, ids=None, extra=None) -> torch.Tensor:
    """transformers' logits at the last position after the prompt and `tokens` (B, t). (B, V)"""
    lm = bb.lm
    if lm_inputs.position_ids is not None:  # M-RoPE: the whole model, which computes the positions itself
        full = torch.cat([ids, tokens], 1)
        mask = torch.cat([lm_inputs.attention_mask, torch.ones_like(tokens)], 1)
        grid = extra["image_grid_thw"]
        return bb.model(input_ids=full, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid,
                        mm_token_type_ids=(full == bb.image_token_id).int()).logits[:, -1]
    if lm.is_encoder_decoder:
        start = torch.full((tokens.shape[0], 1), lm.config.decoder_start_token_id, dtype=torch.long)
        encoder = lm.encode(lm_inputs.inputs_embeds, lm_inputs.attention_mask)
        out = lm.lm(encoder_outputs=(encoder,), attention_mask=lm_inputs.attention_mask,
                    decoder_input_ids=torch.cat([start, tokens], 1))
        return out.logits[:, -1]
    embeds = torch.cat([lm_inputs.inputs_embeds, lm.embed_tokens(tokens)], 1)
    mask = torch.cat([lm_inputs.attention_mask, torch.ones_like(tokens)], 1)
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # what generate passes (BLIP-2 pads sit mid-sequence)
    if bb.family in ("llava", "llava_onevision", "idefics3", "smolvlm"):  # a bare decoder, the head on the outer model
        decoder = bb.model.model.text_model if bb.family in ("idefics3", "smolvlm") else bb.model.model.language_model
        hidden = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
        return bb.model.lm_head(hidden.last_hidden_state)[:, -1]
    return bb.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits[:, -1]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch", [1, 3])
def test_prefill_and_decode_logits_equal_transformers_forward(family, batch):
    bb = build_tiny(family, SIZE, seed=0)
    pixels, ids, mask, extra = tiny_batch(family, SIZE, batch, seed=4)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(5, SIZE.vocab_size, (batch, 4), generator=g)
    with torch.no_grad():
        lm_inputs = bb.prepare(pixels, ids, mask, **extra)
        engine = Engine(bb.lm)
        ours = [engine.prefill(lm_inputs, max_new_tokens=5)]
        for t in range(tokens.shape[1]):
            ours.append(engine.step(tokens[:, t]))
        for t, logits in enumerate(ours):
            ref = _reference_logits(bb, lm_inputs, tokens[:, :t], pixels, ids, extra)
            # 1e-5 in fp32, plus 1e-5 relative: logits of a few units differ by summation order between CPUs' BLAS
            # kernels (1.7e-5 on a logit of 5.6 seen on one machine); a wrong kernel is off by orders more.
            torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
