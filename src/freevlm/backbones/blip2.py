"""BLIP-2: ViT + Q-Former + linear projection + a frozen LM (OPT, FlanT5, or a Llama-family LM).

The same code serves MiniGPT-4: MiniGPT-4 is ViT-g + Q-Former + one linear layer + Vicuna, i.e. the BLIP-2
architecture with a Llama LM, which transformers does not ship as its own class. It is built as a
`Blip2ForConditionalGeneration` whose `text_config` is a `LlamaConfig` (transformers instantiates the LM with
`AutoModelForCausalLM.from_config`). docs/backbones.md maps a MiniGPT-4 checkpoint's weights onto it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipImageProcessorPil,
)

from freevlm.backbones.common import VLMBackbone, build_processor, load_model, load_part
from freevlm.backbones.lm import language_model_adapter
from freevlm.errors import FreeVLMError


def image_features(model: Blip2ForConditionalGeneration, pixel_values: torch.Tensor, **extra) -> torch.Tensor:
    return model.get_image_features(pixel_values, return_dict=True).pooler_output  # (B, Q, D)


def parameter_groups(model) -> dict[str, list]:
    return {
        "vision": list(model.vision_model.parameters()),
        "qformer": [model.query_tokens, *model.qformer.parameters()],
        "projection": list(model.language_projection.parameters()),
        "lm": list(model.language_model.parameters()),
    }


def wrap(model: Blip2ForConditionalGeneration, processor: Blip2Processor | None = None, name: str = "") -> VLMBackbone:
    lm = language_model_adapter(model.language_model)
    return VLMBackbone("blip2", model.eval(), processor, lm, image_features, parameter_groups, name)


def from_config(config: Blip2Config, processor: Blip2Processor | None = None, name: str = "") -> VLMBackbone:
    return wrap(Blip2ForConditionalGeneration(config), processor, name)


def from_pretrained(path: str | Path, *, dtype: torch.dtype | None = None) -> VLMBackbone:
    model = load_model(Blip2ForConditionalGeneration, path, dtype)
    # The PIL image processor: the default BlipImageProcessor needs torchvision, which must not be installed.
    processor = build_processor(
        Blip2Processor,
        path,
        [load_part(BlipImageProcessorPil.from_pretrained, path, "image processor"),
         load_part(AutoTokenizer.from_pretrained, path, "tokenizer")],
        num_query_tokens=model.config.num_query_tokens,
    )
    check_query_tokens(processor, model, path)
    return wrap(model, processor, name=str(path))


def check_query_tokens(processor, model, path) -> None:
    """The processor must insert as many image placeholders as the Q-Former makes queries."""
    n = getattr(processor, "num_query_tokens", None)
    if n is not None and n != model.config.num_query_tokens:
        raise FreeVLMError(f"{path}: the processor inserts {n} image tokens but the model has "
                           f"{model.config.num_query_tokens} query tokens (processor_config.json and config.json "
                           "disagree)")
