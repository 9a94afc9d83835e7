"""Shared test helpers: tiny random backbones of every family and prompt batches shaped like their processors'."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from freevlm.backbones.tiny import BOS_ID, FAMILIES, IMAGE_ID, PAD_ID, TinySize, build_tiny, tiny_images  # noqa: E402

torch.set_num_threads(1)


def pads_left(family: str) -> bool:
    """The families whose processors pad on the far left and put the image placeholders after the first token."""
    return family.startswith(("llava", "qwen", "onevision", "idefics3", "smolvlm"))


def tiny_batch(family: str, size: TinySize, batch: int, seed: int = 0, lengths=(5, 3, 4, 6)):
    """(pixel_values, input_ids, attention_mask, extra) with left padding, as the family's processor lays it out.

    BLIP-2/InstructBLIP put the image placeholders before everything (padding sits between them and the text, as
    transformers' Blip2Processor leaves it); LLaVA, Qwen2-VL, LLaVA-OneVision and Idefics3/SmolVLM pad on the far
    left and put the placeholders after the first token (Qwen2-VL's and LLaVA-OneVision's images differ in size across
    rows, Idefics3/SmolVLM's are split into different numbers of tiles, so do their placeholder counts differ).
    """
    g = torch.Generator().manual_seed(seed)
    lens = list(lengths[:batch])
    texts = [[BOS_ID] + torch.randint(5, size.vocab_size, (n,), generator=g).tolist() for n in lens]
    pixels, extra, n_imgs = tiny_images(family, size, batch, g)
    left_pad = pads_left(family)
    width = max(len(t) + (n if left_pad else 0) for t, n in zip(texts, n_imgs))
    rows, masks = [], []
    for text, n_img in zip(texts, n_imgs):
        if left_pad:
            pad = [PAD_ID] * (width - len(text) - n_img)
            row = pad + text[:1] + [IMAGE_ID] * n_img + text[1:]
            mask = [0] * len(pad) + [1] * (len(row) - len(pad))
        else:
            pad = [PAD_ID] * (width - len(text))
            row = [IMAGE_ID] * n_img + pad + text
            mask = [1] * n_img + [0] * len(pad) + [1] * len(text)
        rows.append(row)
        masks.append(mask)
    if family.startswith("instructblip"):
        extra = dict(
            qformer_input_ids=torch.randint(5, size.vocab_size, (batch, 4), generator=g),
            qformer_attention_mask=torch.ones(batch, 4, dtype=torch.long),
        )
    ids = torch.tensor(rows)
    if "image_grid_thw" in extra:  # Qwen2-VL's processor also returns the token types M-RoPE is computed from
        extra["mm_token_type_ids"] = (ids == IMAGE_ID).int()
    return pixels, ids, torch.tensor(masks), extra


@pytest.fixture(scope="session")
def tiny_size() -> TinySize:
    return TinySize()


@pytest.fixture(scope="session", params=FAMILIES)
def any_backbone(request, tiny_size):
    return build_tiny(request.param, tiny_size, seed=0)


@pytest.fixture(scope="session")
def opt_backbone(tiny_size):
    return build_tiny("blip2-opt", tiny_size, seed=0)


def make_eos_likely(backbone, family: str, size: TinySize, strength: float = 6.0) -> None:
    """Point the head's EOS row at the tokens the model usually predicts, so that random tiny models end sequences
    (and beams finish) at different steps: the EOS paths of greedy and beam search then get exercised."""
    from freevlm.backbones.tiny import EOS_ID
    from freevlm.generation.decode import generate_from_inputs

    pixels, ids, mask, extra = tiny_batch(family, size, 3, seed=9)
    with torch.no_grad():
        res = generate_from_inputs(backbone.lm, None, backbone.prepare(pixels, ids, mask, **extra),
                                   max_new_tokens=8, output_logits=True)
        usual = torch.stack(res.logits).flatten(0, 1).argmax(-1)
        head = backbone.lm.lm_head.weight
        head[EOS_ID] = head[usual].mean(0) * (1.3 if backbone.lm.is_encoder_decoder else strength)
