"""InstructBLIP: BLIP-2 whose Q-Former also reads the instruction. Released LMs: Vicuna (Llama) and FlanT5."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    BlipImageProcessorPil,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
)

from freevlm.backbones.blip2 import check_query_tokens, parameter_groups
from freevlm.backbones.common import VLMBackbone, build_processor, load_model, load_part
from freevlm.backbones.lm import language_model_adapter


def image_features(model, pixel_values, qformer_input_ids=None, qformer_attention_mask=None, **extra) -> torch.Tensor:
    if qformer_input_ids is None:
        raise ValueError("InstructBLIP needs qformer_input_ids (the instruction, tokenised for the Q-Former)")
    if qformer_input_ids.shape[-1] == 0:
        # An empty instruction through a Q-Former tokenizer that adds no special tokens: the processor returns a
        # (B, 0) *float* tensor. No text = the queries alone, as a row of a padded batch whose text is all padding:
        # one masked column (its id is never attended to).
        b = qformer_input_ids.shape[0]
        qformer_input_ids = torch.zeros((b, 1), dtype=torch.long, device=pixel_values.device)
        qformer_attention_mask = torch.zeros((b, 1), dtype=torch.long, device=pixel_values.device)
    return model.get_image_features(
        pixel_values, qformer_input_ids=qformer_input_ids, qformer_attention_mask=qformer_attention_mask,
        return_dict=True,
    ).pooler_output  # (B, Q, D)


def wrap(model: InstructBlipForConditionalGeneration, processor=None, name: str = "") -> VLMBackbone:
    lm = language_model_adapter(model.language_model)
    return VLMBackbone("instructblip", model.eval(), processor, lm, image_features, parameter_groups, name)


def from_config(config: InstructBlipConfig, processor=None, name: str = "") -> VLMBackbone:
    return wrap(InstructBlipForConditionalGeneration(config), processor, name)


def from_pretrained(path: str | Path, *, dtype: torch.dtype | None = None) -> VLMBackbone:
    model = load_model(InstructBlipForConditionalGeneration, path, dtype)
    processor = build_processor(
        InstructBlipProcessor,
        path,
        [load_part(BlipImageProcessorPil.from_pretrained, path, "image processor"),
         load_part(AutoTokenizer.from_pretrained, path, "tokenizer"),
         load_part(AutoTokenizer.from_pretrained, Path(path) / "qformer_tokenizer", "Q-Former tokenizer")],
        num_query_tokens=model.config.num_query_tokens,
    )
    check_query_tokens(processor, model, path)
    return wrap(model, processor, name=str(path))
