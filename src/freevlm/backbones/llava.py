"""LLaVA: a CLIP-style vision tower + an MLP projector + a Llama-family LM; the one family without a Q-Former.

Image features come from one vision layer (`vision_feature_layer`), one per patch (the CLS token dropped under the
"default" strategy), and replace as many `<image>` placeholders in the prompt. The LM is the bare decoder
`model.model.language_model`, with the head on the outer model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessorPil,
    LlavaProcessor,
)

from freevlm.backbones.common import VLMBackbone, build_processor, load_model, load_part
from freevlm.backbones.lm import language_model_adapter


def image_features(model: LlavaForConditionalGeneration, pixel_values: torch.Tensor, **extra) -> torch.Tensor:
    cfg = model.config
    out = model.get_image_features(
        pixel_values, vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy, return_dict=True,
    )
    return torch.cat(list(out.pooler_output), dim=0)  # (B*patches, D)


def parameter_groups(model) -> dict[str, list]:
    return {
        "vision": list(model.model.vision_tower.parameters()),
        "projection": list(model.model.multi_modal_projector.parameters()),
        "lm": [*model.model.language_model.parameters(), *model.lm_head.parameters()],
    }


def wrap(model: LlavaForConditionalGeneration, processor: LlavaProcessor | None = None, name: str = "") -> VLMBackbone:
    lm = language_model_adapter(model.model.language_model, lm_head=model.lm_head)
    return VLMBackbone("llava", model.eval(), processor, lm, image_features, parameter_groups, name)


def from_config(config: LlavaConfig, processor: LlavaProcessor | None = None, name: str = "") -> VLMBackbone:
    return wrap(LlavaForConditionalGeneration(config), processor, name)


def from_pretrained(path: str | Path, *, dtype: torch.dtype | None = None) -> VLMBackbone:
    model = load_model(LlavaForConditionalGeneration, path, dtype)
    cfg = model.config
    # Every field of processor_config.json is kept (num_additional_image_tokens above all: llava-hf checkpoints
    # whose vision tower has a CLS token set it to 1); the model config only fills the fields the file lacks.
    processor = build_processor(
        LlavaProcessor,
        path,
        [load_part(LlavaImageProcessorPil.from_pretrained, path, "image processor"),
         load_part(AutoTokenizer.from_pretrained, path, "tokenizer")],
        patch_size=cfg.vision_config.patch_size, vision_feature_select_strategy=cfg.vision_feature_select_strategy,
    )
    return wrap(model, processor, name=str(path))
