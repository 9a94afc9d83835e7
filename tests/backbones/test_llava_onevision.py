"""LLaVA-OneVision specifics: anyres images of different sizes through the processor (placeholder counts that depend
on the image's size), and checkpoint folders.

(Parity with `generate`, kernel logits, speculative decoding and the property tests run on this family through
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
from freevlm.generation.decode import generate_from_inputs

FAMILY = "onevision-qwen2"


def _images():
    return [Image.new("RGB", (32, 32), "red"), Image.new("RGB", (64, 32), "green"), Image.new("RGB", (40, 56), "blue")]


def test_anyres_images_of_different_sizes_decode_as_generate_and_a_saved_folder_loads(tmp_path):
    from freevlm.data.tokenizer import build_word_tokenizer
    from freevlm.generation.api import EarlyExitVLM

    tok = build_word_tokenizer(["a photo of red green blue square"])
    size = TinySize(vocab_size=len(tok), lm_layers=3)
    bb = build_tiny(FAMILY, size, processor=tiny_processor(FAMILY, tok, size), seed=0)
    tok.padding_side = "left"
    prompts = ["a photo of", "a", "a photo"]
    enc = bb.processor(images=_images(), text=[bb.image_prompt(p) for p in prompts], return_tensors="pt")
    counts = (enc["input_ids"] == IMAGE_ID).sum(1).tolist()
    assert len(set(counts)) == 3 and enc["attention_mask"].min() == 0  # three sizes, three counts, left padding
    with torch.no_grad():  # the vision side makes exactly as many features as the processor left placeholders
        assert bb.image_features(enc["pixel_values"], image_sizes=enc["image_sizes"]).shape[0] == sum(counts)
    extra = {k: enc[k] for k in ("image_sizes", "batch_num_images")}
    with torch.no_grad():
        ref = bb.hf_generate(enc["pixel_values"], enc["input_ids"], enc["attention_mask"], max_new_tokens=5,
                             do_sample=False, num_beams=2, **extra)
        ours = generate_from_inputs(bb.lm, None, bb.prepare(enc["pixel_values"], enc["input_ids"],
                                                            enc["attention_mask"], **extra),
                                    generation_config=bb.model.generation_config, max_new_tokens=5, num_beams=2)
    assert torch.equal(ref[:, enc["input_ids"].shape[1]:], ours.sequences)

    folder = tmp_path / "onevision"
    bb.model.save_pretrained(folder)
    bb.processor.save_pretrained(folder)
    assert family_of_keys(weight_keys(folder)) == "llava_onevision"
    loaded = load_backbone(folder)
    assert loaded.family == "llava_onevision" and loaded.lm.num_layers == 3
    out = EarlyExitVLM.from_pretrained(folder).generate(_images(), prompts, max_new_tokens=5, use_exits=False)
    direct = EarlyExitVLM(bb).generate(_images(), prompts, max_new_tokens=5, use_exits=False)
    assert torch.equal(out.sequences, direct.sequences) and out.texts == direct.texts

    config = json.loads((folder / "config.json").read_text())  # config.json says LLaVA, the weights OneVision's
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llava"}))
    with pytest.raises(FreeVLMError, match="weights in .* are a LLaVA-OneVision model's"):
        load_backbone(folder)
