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
