"""Teacher-forced layer-by-layer forward = the transformers model's own forward, for every family."""

from __future__ import annotations

import torch

from freevlm.backbones.common import image_rows
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


def test_frozen_image_features_are_computed_once_per_image_and_change_nothing(any_backbone, tiny_size, monkeypatch):
    from freevlm.train.forward import FrozenImageFeatures

    family = any_backbone.name.removeprefix("tiny-")
    pixels, ids, mask, extra = tiny_batch(family, tiny_size, 3, seed=5)
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, IGNORE))
    if any_backbone.lm.is_encoder_decoder:
        labels = torch.randint(5, tiny_size.vocab_size, (3, 4), generator=torch.Generator().manual_seed(1))
    first = Batch(["a", "b", "c"], pixels, ids, mask, labels, extra)
    # the second batch repeats image 2 in row 0 and brings a new image in row 1 (of row 1's size: some families'
    # placeholder counts depend on it; with row 1's tiles: Idefics3/SmolVLM's padding tiles are all zero, and its
    # placeholder count depends on the real ones)
    row = lambda r: image_rows(pixels, extra, [r])[0]  # noqa: E731
    pixels2 = torch.cat([row(2), torch.randn_like(row(1)) * row(1).ne(0), row(0)])
    extra2 = {k: v[[2, 0, 0]] for k, v in extra.items()}  # rows 0 and 2 keep their images' own instructions
    if {"image_grid_thw", "image_sizes"} & set(extra):  # the image's size goes with it
        extra2 = {k: v[[2, 1, 0]] for k, v in extra.items()}
    second = Batch(["c", "d", "a"], pixels2, ids[[2, 1, 0]], mask[[2, 1, 0]], labels[[2, 1, 0]], extra2)
    calls = []
    original = any_backbone.image_features
    images = lambda px, kw: len(kw.get("image_grid_thw", px))  # noqa: E731
    monkeypatch.setattr(any_backbone, "image_features",
                        lambda px, **kw: calls.append(images(px, kw)) or original(px, **kw))
    cache = FrozenImageFeatures(any_backbone)
    with torch.no_grad():
        for batch in (first, second):
            plain = teacher_forced(any_backbone, batch, logits=True)
            cached = teacher_forced(any_backbone, batch, logits=True, image_features=cache(batch))
            torch.testing.assert_close(cached.logits, plain.logits, atol=1e-5, rtol=0)
    # plain runs: 3 + 3 rows; the cache: 3 rows, then only the new image of the second batch
    assert calls == [3, 3, 3, 1] and len(cache.store) == 4
    full = FrozenImageFeatures(any_backbone, max_bytes=0)  # nothing fits: every row is computed, none stored
    full(first)
    assert not full.store and calls[-1] == 3
