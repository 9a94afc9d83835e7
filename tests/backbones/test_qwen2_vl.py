"""Qwen2-VL / Qwen2.5-VL specifics: multimodal RoPE in the engine's caches (propagation and catch-up against
transformers' own recomputation), images of different sizes through the processor, and checkpoint folders.

(Parity with `generate`, kernel logits, speculative decoding and the property tests run on these families through
`FAMILIES`; see tests/backbones/test_parity.py and tests/generation.)
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from freevlm.backbones import load_backbone
from freevlm.backbones.common import family_of_keys, weight_keys
from freevlm.backbones.tiny import IMAGE_ID, TinySize, build_tiny, tiny_processor
from freevlm.errors import FreeVLMError
from freevlm.exits import ExitSpec, build_exits
from freevlm.generation.decode import generate_from_inputs
from freevlm.generation.kv import SkipPolicy
from tests.conftest import tiny_batch
from tests.generation.test_engine import Scripted

SIZE = TinySize(lm_layers=5)
FAMILY = "qwen2vl-qwen2"


@pytest.fixture(scope="module")
def setup():
    bb = build_tiny(FAMILY, SIZE, seed=0)
    torch.manual_seed(1)
    return bb, build_exits(bb.lm, ExitSpec("transformer", [2, 3]))


def _hf_cache(bb, ids, mask, pixels, extra, generated):
    """transformers' own K/V over prompt + generated[:-1]: the whole model, which computes the 3-D positions itself."""
    full = torch.cat([ids, generated[:, :-1]], 1)
    full_mask = torch.cat([mask, torch.ones_like(generated[:, :-1])], 1)
    out = bb.model(input_ids=full, attention_mask=full_mask, pixel_values=pixels,
                   image_grid_thw=extra["image_grid_thw"], mm_token_type_ids=(full == IMAGE_ID).int(), use_cache=True)
    return out.past_key_values, full_mask


@pytest.mark.parametrize("policy", ["propagate", "catch_up"])
def test_skipped_layers_kv_equal_transformers_recomputation_under_mrope(setup, policy):
    """Tokens leave at layer 2 (propagate: their skipped layers get K/V projected from h_2; catch-up: the deeper
    layers run later). Propagated entries must carry RoPE at the token's M-RoPE position (one past the prompt's
    largest, per row: transformers' rope_deltas) and equal layer j's own K/V of h_2; after catch-up's flush every
    entry equals transformers' cache of the same sequence."""
    bb, exits = setup
    pixels, ids, mask, extra = tiny_batch(FAMILY, SIZE, 3, seed=5)  # images of three sizes, left padding
    steps = 4
    plan = [[None] * 3] + [[0] * 3] * steps  # every decode step leaves at the first exit (layer 2)
    with torch.no_grad():
        res = generate_from_inputs(bb.lm, exits, bb.prepare(pixels, ids, mask, **extra), criterion=Scripted(plan),
                                   policy=SkipPolicy(policy), max_new_tokens=steps, min_new_tokens=steps,
                                   keep_cache=True)
        assert all(seq[1:] == [2] * (steps - 1) for seq in res.exit_layers)
        ref, full_mask = _hf_cache(bb, ids, mask, pixels, extra, res.sequences)
        cache = res.caches()
        p, width = ids.shape[1], full_mask.shape[1]
        real = full_mask.bool()[:, None, :, None]
        if policy == "catch_up":
            for j in range(bb.lm.num_layers):
                torch.testing.assert_close(cache.keys[j][:, :, :width] * real, ref.layers[j].keys * real,
                                           atol=1e-5, rtol=0)
                torch.testing.assert_close(cache.values[j][:, :, :width] * real, ref.layers[j].values * real,
                                           atol=1e-5, rtol=0)
            return
        # propagate: layers 1-2 ran for real; deeper layers hold layer j's projection of h_2, at the M-RoPE position
        from transformers.models.qwen2_vl.modeling_qwen2_vl import rotate_half

        states = _hidden_states(bb, ids, mask, pixels, extra, res.sequences)
        mrope = bb.prepare(pixels, ids, mask, **extra).position_ids
        first = mrope.amax((0, 2))  # (B,) largest prompt position per row
        assert not torch.equal(first + 1, mask.sum(1)), "M-RoPE positions should differ from token counts here"
        hd = bb.lm.head_dim
        for t in range(1, steps):  # generated token t-1 was fed at column p + t - 1
            col = p + t - 1
            pos = (first + t).view(1, -1, 1).expand(3, -1, 1)  # all three sections equal for generated tokens
            h2 = states[2][:, col : col + 1]  # (B, 1, D)
            cos, sin = bb.lm.rotary_emb(h2, pos)
            for j in range(3, bb.lm.num_layers + 1):
                layer = bb.lm.layers[j - 1]
                x = layer.input_layernorm(h2)
                k = layer.self_attn.k_proj(x).view(3, 1, -1, hd).transpose(1, 2)  # (B, H, 1, hd)
                v = layer.self_attn.v_proj(x).view(3, 1, -1, hd).transpose(1, 2)
                k = k * cos[:, None] + rotate_half(k) * sin[:, None]
                torch.testing.assert_close(cache.keys[j - 1][:, :, col : col + 1], k, atol=1e-5, rtol=0)
                torch.testing.assert_close(cache.values[j - 1][:, :, col : col + 1], v, atol=1e-5, rtol=0)
            for j in (1, 2):  # the layers the token ran: transformers' own entries
                torch.testing.assert_close(cache.keys[j - 1][:, :, col], ref.layers[j - 1].keys[:, :, col],
                                           atol=1e-5, rtol=0)


def _hidden_states(bb, ids, mask, pixels, extra, generated):
    full = torch.cat([ids, generated[:, :-1]], 1)
    full_mask = torch.cat([mask, torch.ones_like(generated[:, :-1])], 1)
    out = bb.model(input_ids=full, attention_mask=full_mask, pixel_values=pixels,
                   image_grid_thw=extra["image_grid_thw"], mm_token_type_ids=(full == IMAGE_ID).int(),
                   output_hidden_states=True)
    return out.hidden_states  # h_0 .. h_N (the last one after the final norm, unused here)


def _images():
    return [Image.new("RGB", (32, 32), "red"), Image.new("RGB", (48, 32), "green"), Image.new("RGB", (32, 64), "blue")]


@pytest.mark.parametrize("family", ["qwen2vl-qwen2", "qwen25vl-qwen2"])
def test_processor_batches_images_of_different_sizes_and_a_saved_folder_loads(tmp_path, family):
    """Images of three sizes in one left-padded batch through the processor: the engine's tokens equal the model's
    own `generate`; the model saved with its processor loads back (`load_backbone`, `EarlyExitVLM.from_pretrained`)
    with the family told from the weights, and decodes the same."""
    from freevlm.data.tokenizer import build_word_tokenizer
    from freevlm.generation.api import EarlyExitVLM

    tok = build_word_tokenizer(["a photo of red green blue square"])
    size = TinySize(vocab_size=len(tok), lm_layers=3)
    bb = build_tiny(family, size, processor=tiny_processor(family, tok, size), seed=0)
    tok.padding_side = "left"
    enc = bb.processor(images=_images(), text=[bb.image_prompt(p) for p in ("a photo of", "a", "a photo")],
                       return_tensors="pt")
    grids = enc["image_grid_thw"].tolist()
    assert len({tuple(g) for g in grids}) == 3 and enc["attention_mask"].min() == 0
    assert (enc["input_ids"] == IMAGE_ID).sum(1).tolist() == [g[0] * g[1] * g[2] // 4 for g in grids]
    extra = {k: enc[k] for k in ("image_grid_thw", "mm_token_type_ids")}
    with torch.no_grad():
        ref = bb.hf_generate(enc["pixel_values"], enc["input_ids"], enc["attention_mask"], max_new_tokens=5,
                             do_sample=False, **extra)
        ours = generate_from_inputs(bb.lm, None, bb.prepare(enc["pixel_values"], enc["input_ids"],
                                                            enc["attention_mask"], **extra),
                                    generation_config=bb.model.generation_config, max_new_tokens=5)
    assert torch.equal(ref[:, enc["input_ids"].shape[1]:], ours.sequences)

    folder = tmp_path / family
    bb.model.save_pretrained(folder)
    bb.processor.save_pretrained(folder)
    model_type = bb.model.config.model_type
    assert family_of_keys(weight_keys(folder)) == model_type
    loaded = load_backbone(folder)
    assert loaded.family == model_type and loaded.lm.num_layers == 3
    vlm = EarlyExitVLM.from_pretrained(folder)
    out = vlm.generate(_images(), ["a photo of", "a", "a photo"], max_new_tokens=5, use_exits=False)
    direct = EarlyExitVLM(bb).generate(_images(), ["a photo of", "a", "a photo"], max_new_tokens=5, use_exits=False)
    assert torch.equal(out.sequences, direct.sequences) and out.texts == direct.texts

    other = "qwen2_5_vl" if model_type == "qwen2_vl" else "qwen2_vl"  # config.json and weights disagree
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": other}))
    with pytest.raises(FreeVLMError, match="weights in .* are a Qwen2"):
        load_backbone(folder)


def test_videos_and_missing_grids_fail_in_one_line(setup):
    bb, _ = setup
    pixels, ids, mask, extra = tiny_batch(FAMILY, SIZE, 2, seed=1)
    with pytest.raises(FreeVLMError, match="images only; videos"):
        bb.prepare(pixels, ids, mask, **extra, pixel_values_videos=pixels)
    with pytest.raises(FreeVLMError, match="need their image_grid_thw"):
        bb.prepare(pixels, ids, mask)
