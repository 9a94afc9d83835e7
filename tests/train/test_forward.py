"""Teacher-forced layer-by-layer forward = the transformers model's own forward, for every family."""

from __future__ import annotations

import torch

from freevlm.train.batches import IGNORE, Batch
from freevlm.train.forward import shift_right, teacher_forced
from tests.conftest import tiny_batch


def test_teacher_forced_logits_match_hf_forward(any_backbone, tiny_size):
    family = any_backbone.name.removeprefix("tiny-")
    pixels, ids, mask, extra = tiny_batch(family, tiny_size, 3, seed=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if any_backbone.lm.is_encoder_decoder:
            labels = torch.randint(5, tiny_size.vocab_size, (3, 5), generator=g)
            labels[0, -2:] = IGNORE
            batch = Batch(["a", "b", "c"], pixels, ids, mask, labels, extra)
            cfg = any_backbone.lm.config
            ref = any_backbone.model(pixel_values=pixels, input_ids=ids, attention_mask=mask,
                                     decoder_input_ids=shift_right(labels, cfg.decoder_start_token_id,
                                                                   cfg.pad_token_id), **extra).logits
        else:
            labels = torch.where(mask.bool(), ids, torch.full_like(ids, IGNORE))
            batch = Batch(["a", "b", "c"], pixels, ids, mask, labels, extra)
            ref = any_backbone.model(pixel_values=pixels, input_ids=ids, attention_mask=mask, **extra).logits
        ours = teacher_forced(any_backbone, batch, logits=True)
    real = mask.bool() if not any_backbone.lm.is_encoder_decoder else torch.ones(ref.shape[:2], dtype=torch.bool)
    torch.testing.assert_close(ours.logits[real], ref[real], atol=1e-4, rtol=0)
    assert set(ours.states) == set(range(any_backbone.lm.num_layers + 1))
    torch.testing.assert_close(any_backbone.lm.head(any_backbone.lm.final_norm(ours.final))[real], ref[real],
                               atol=1e-4, rtol=0)
    if not any_backbone.lm.is_encoder_decoder:  # targets are the next positions' labels
        assert torch.equal(ours.targets[:, :-1], labels[:, 1:])
        assert (ours.targets[:, -1] == IGNORE).all()
