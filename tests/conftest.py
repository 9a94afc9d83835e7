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
    transformers' Blip2Processor leaves it); LLaVA pads on the far left and puts the placeholders after BOS, and so do
    Idefics3/SmolVLM, with as many placeholders as the row's image has tiles (`image_tiles`).
    """
    g = torch.Generator().manual_seed(seed)
    n_img = num_image_tokens(family, size)
    lens = list(lengths[:batch])
    tiles = image_tiles(family, batch)
    width = max(lens)
    tiled_width = max(1 + n + t * n_img for n, t in zip(lens, tiles))
    rows, masks = [], []
    for n, t in zip(lens, tiles):
        text = [BOS_ID] + torch.randint(5, size.vocab_size, (n,), generator=g).tolist()
        if t:  # Idefics3/SmolVLM: t tiles of n_img placeholders each, padded on the far left
            row = text[:1] + [IMAGE_ID] * (t * n_img) + text[1:]
            rows.append([PAD_ID] * (tiled_width - len(row)) + row)
            masks.append([0] * (tiled_width - len(row)) + [1] * len(row))
            continue
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
    if any(tiles):  # (B, tiles, 3, H, W); a row with fewer tiles is padded with all-zero ones, as the processor does
        pixels = torch.randn(batch, max(tiles), 3, size.image_size, size.image_size, generator=g)
        for r, t in enumerate(tiles):
            pixels[r, t:] = 0.0
    extra = {}
    if family.startswith("instructblip"):
        extra = dict(
            qformer_input_ids=torch.randint(5, size.vocab_size, (batch, 4), generator=g),
            qformer_attention_mask=torch.ones(batch, 4, dtype=torch.long),
        )
    return pixels, torch.tensor(rows), torch.tensor(masks), extra


def image_tiles(family: str, batch: int) -> list[int]:
    """Image tiles per row: Idefics3/SmolVLM split images into tiles (rows of a batch differ: images of different
    sizes), the other families see one image as a whole (0: no tiles)."""
    if family.startswith(("idefics3", "smolvlm")):
        return [1, 3, 2, 1][:batch] if batch > 1 else [3]
    return [0] * batch


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
