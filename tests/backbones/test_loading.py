"""Loading backbones from checkpoint folders, without torchvision, and the default exit placement rule."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BlipImageProcessorPil, OPTConfig, OPTForCausalLM, T5Config, T5ForConditionalGeneration
from transformers.utils import is_torchvision_available

from freevlm.backbones import load_backbone
from freevlm.backbones.lm import DecoderOnlyLM, EncoderDecoderLM, default_exit_layers
from freevlm.errors import FreeVLMError
from tests.train.conftest import colour_task


def test_a_saved_blip2_folder_loads_with_the_pil_processor_and_same_outputs(tmp_path):
    assert not is_torchvision_available()  # the point of the PIL processors: this environment has none
    backbone, examples = colour_task(tmp_path / "images")
    backbone.model.save_pretrained(tmp_path / "ckpt")
    backbone.processor.save_pretrained(tmp_path / "ckpt")
    loaded = load_backbone(tmp_path / "ckpt")
    assert isinstance(loaded.processor.image_processor, BlipImageProcessorPil)
    assert loaded.processor.tokenizer("a red square")["input_ids"] == backbone.processor.tokenizer(
        "a red square")["input_ids"]
    from freevlm.train.batches import Collator

    batch = Collator(loaded, train=False)(examples[:2])
    with torch.no_grad():
        a = backbone.model(pixel_values=batch.pixel_values, input_ids=batch.input_ids).logits
        b = loaded.model(pixel_values=batch.pixel_values, input_ids=batch.input_ids).logits
    torch.testing.assert_close(a, b)


def test_folder_errors_are_one_line(tmp_path):
    with pytest.raises(FreeVLMError, match="checkpoint folder not found"):
        load_backbone(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FreeVLMError, match="no config.json"):
        load_backbone(tmp_path / "empty")
    OPTForCausalLM(OPTConfig(hidden_size=8, num_hidden_layers=1, ffn_dim=8, num_attention_heads=2, vocab_size=10,
                             word_embed_proj_dim=8)).save_pretrained(tmp_path / "opt")
    with pytest.raises(FreeVLMError, match="holds a 'opt' model; freevlm supports"):
        load_backbone(tmp_path / "opt")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(FreeVLMError, match="unreadable config"):
        load_backbone(tmp_path / "bad")


def test_paper_exit_layers_at_paper_depths_and_scaled_elsewhere():
    with torch.device("meta"):
        opt32 = DecoderOnlyLM.from_opt(OPTForCausalLM(OPTConfig(num_hidden_layers=32, hidden_size=16, ffn_dim=16,
                                                                num_attention_heads=2, word_embed_proj_dim=16)))
        opt12 = DecoderOnlyLM.from_opt(OPTForCausalLM(OPTConfig(num_hidden_layers=12, hidden_size=16, ffn_dim=16,
                                                                num_attention_heads=2, word_embed_proj_dim=16)))
        t5 = EncoderDecoderLM(T5ForConditionalGeneration(T5Config(num_layers=24, num_decoder_layers=24, d_model=16,
                                                                  d_kv=4, d_ff=16, num_heads=4)))
    assert default_exit_layers(opt32) == [3, 6, 9, 12, 24, 27, 30]
    assert default_exit_layers(t5) == [3, 5, 7, 9, 12, 20, 22]
    assert default_exit_layers(opt12) == [1, 2, 3, 4, 9, 10, 11]  # round(l * 12 / 32)
    assert json.dumps(default_exit_layers(opt12))  # plain ints


def _cls_token_llava(folder):
    """A llava-hf-style folder: the CLIP tower's CLS token makes 17 features for 16 patches, the "default" strategy
    drops it, and the processor records that with num_additional_image_tokens=1 (so 16 + 1 - 1 placeholders)."""
    from transformers import LlavaImageProcessorPil, LlavaProcessor

    from freevlm.backbones.tiny import build_tiny
    from freevlm.data.tokenizer import build_word_tokenizer

    tok = build_word_tokenizer(["a photo of red green square"])
    image_processor = LlavaImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor, tok, patch_size=8, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1)
    backbone = build_tiny("llava-llama", processor=processor, seed=0)
    assert backbone.model.config.vision_feature_select_strategy == "default"
    backbone.model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return backbone


def test_a_cls_token_llava_folder_keeps_its_processor_fields_and_generates(tmp_path):
    from PIL import Image

    from freevlm.generation.api import EarlyExitVLM

    _cls_token_llava(tmp_path / "llava")
    saved = json.loads((tmp_path / "llava" / "processor_config.json").read_text())
    vlm = EarlyExitVLM.from_pretrained(tmp_path / "llava")
    processor = vlm.backbone.processor
    for key in ("num_additional_image_tokens", "patch_size", "vision_feature_select_strategy", "image_token"):
        assert getattr(processor, key) == saved[key], key
    assert processor.num_additional_image_tokens == 1
    # rebuilt from the model config alone (the old loader), the prompt got 15 placeholders for 16 features
    out = vlm.generate([Image.new("RGB", (32, 32), "red")], ["a photo of"], max_new_tokens=3, use_exits=False)
    assert len(out.sequences) == 1 and len(out.exit_layers[0]) >= 1


def test_a_config_edited_to_fewer_or_more_layers_than_the_weights_is_refused(tmp_path):
    """No silent truncation (or random layers): checked on LLaVA, whose files use transformers' legacy key names."""
    import shutil

    _cls_token_llava(tmp_path / "llava")
    for layers, message in ((2, "gives model.language_model.layers 2 layers but the weights hold 4"),
                            (6, "gives model.language_model.layers 6 layers but the weights hold only 4")):
        folder = tmp_path / f"llava-{layers}"
        shutil.copytree(tmp_path / "llava", folder)
        config = json.loads((folder / "config.json").read_text())
        config["text_config"]["num_hidden_layers"] = layers
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(FreeVLMError, match=message):
            load_backbone(folder)
