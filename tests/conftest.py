"""Shared test helpers: tiny random backbones of every family and prompt batches shaped like their processors'."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from freevlm.backbones.tiny import BOS_ID, FAMILIES, IMAGE_ID, PAD_ID, TinySize, build_tiny, num_image_tokens  # noqa: E402

torch.set_num_threads(1)


def tiny_batch(family: str, size: TinySize, batch: int, seed: int = 0, lengths=(5, 3, 4, 6)):
    """(pixel_values, input_ids, attention_mask, extra) with left padding, as the family's processor lays it out.

    BLIP-2/InstructBLIP put the image placeholders before everything (padding sits between them and the text, as
    transformers' Blip2Processor leaves it); LLaVA pads on the far left and puts the placeholders after BOS.
    """
    g = torch.Generator().manual_seed(seed)
    n_img = num_image_tokens(family, size)
    lens = list(lengths[:batch])
    width = max(lens)
    rows, masks = [], []
    for n in lens:
        text = [BOS_ID] + torch.randint(5, size.vocab_size, (n,), generator=g).tolist()
        pad = [PAD_ID] * (width - n)
        if family.startswith("llava"):
            row = pad + text[:1] + [IMAGE_ID] * n_img + text[1:]
            mask = [0] * len(pad) + [1] * (len(row) - len(pad))
        else:
            row = [IMAGE_ID] * n_img + pad + text
            mask = [1] * n_img + [0] * len(pad) + [1] * len(text)
        rows.append(row)
        masks.append(mask)
    pixels = torch.randn(batch, 3, size.image_size, size.image_size, generator=g)
    extra = {}
    if family.startswith("instructblip"):
        extra = dict(
            qformer_input_ids=torch.randint(5, size.vocab_size, (batch, 4), generator=g),
            qformer_attention_mask=torch.ones(batch, 4, dtype=torch.long),
        )
    return pixels, torch.tensor(rows), torch.tensor(masks), extra


@pytest.fixture(scope="session")
def tiny_size() -> TinySize:
    return TinySize()


@pytest.fixture(scope="session", params=FAMILIES)
def any_backbone(request, tiny_size):
    return build_tiny(request.param, tiny_size, seed=0)


@pytest.fixture(scope="session")
def opt_backbone(tiny_size):
    return build_tiny("blip2-opt", tiny_size, seed=0)
