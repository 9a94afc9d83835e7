"""LLaVA-OneVision: a SigLIP vision tower over "anyres" tiles + an MLP projector + a Qwen2 LM (QKV biases, GQA, 1-D
RoPE: the Llama kernel's path).

Anyres: each image is resized to the best of `image_grid_pinpoints` and cut into tiles of the tower's input size, plus
one tile of the whole image; the image processor returns `pixel_values` (B, max tiles, 3, S, S) and `image_sizes`
(B, 2). The model unpads the tiles' features back to the image's aspect ratio, adds a newline feature per row of
patches, and puts the base tile's features first, so an image's placeholder count depends on its size
(`image_tokens`, transformers' own count). The LM is the bare decoder `model.model.language_model`, the head on the
outer model (as LLaVA).
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import (
    AutoTokenizer,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
)
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

from freevlm.backbones.common import ImageTextProcessor, VLMBackbone, load_model, load_part
from freevlm.backbones.lm import language_model_adapter


def image_features(model, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None,
                   batch_num_images: torch.Tensor | None = None, **extra) -> torch.Tensor:
    cfg = model.config
    out = model.model.get_image_features(
        pixel_values, image_sizes, vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy, vision_aspect_ratio=cfg.vision_aspect_ratio,
        batch_num_images=batch_num_images, return_dict=True,
    )
    return torch.cat(list(out.pooler_output), dim=0)  # (sum of every image's features, D)


def image_tokens(config: LlavaOnevisionConfig, height: int, width: int) -> int:
    """Placeholders for one (height, width) image: transformers' `LlavaOnevisionProcessor` count (the base tile, the
    unpadded anyres tiles and one newline per row of patches), read from the model config."""
    side = config.vision_config.image_size
    counter = SimpleNamespace(
        image_processor=SimpleNamespace(image_grid_pinpoints=config.image_grid_pinpoints),
        num_image_tokens=(side // config.vision_config.patch_size) ** 2,
        vision_aspect_ratio=config.vision_aspect_ratio,
    )
    counter._get_unpadded_features = functools.partial(LlavaOnevisionProcessor._get_unpadded_features, counter)
    n = LlavaOnevisionProcessor._get_number_of_features(counter, height, width, side, side)
    return n - 1 if config.vision_feature_select_strategy == "default" else n


def processor(image_processor, tokenizer, config: LlavaOnevisionConfig) -> ImageTextProcessor:
    """What transformers' `LlavaOnevisionProcessor` does for images (it cannot be built without torchvision, which
    its video processor needs): see `ImageTextProcessor`."""
    def tokens_per_image(_, vision: dict) -> list[int]:
        return [image_tokens(config, int(h), int(w)) for h, w in vision["image_sizes"]]

    def image_prompt(_, image_token: str, prompt: str) -> str:
        return f"{image_token}\n{prompt}"

    return ImageTextProcessor(image_processor, tokenizer, config.image_token_id, tokens_per_image, image_prompt)


def parameter_groups(model) -> dict[str, list]:
    return {
        "vision": list(model.model.vision_tower.parameters()),
        "projection": [*model.model.multi_modal_projector.parameters(), model.model.image_newline],
        "lm": [*model.model.language_model.parameters(), *model.lm_head.parameters()],
    }


def wrap(model: LlavaOnevisionForConditionalGeneration, processor=None, name: str = "") -> VLMBackbone:
    lm = language_model_adapter(model.model.language_model, lm_head=model.lm_head)
    return VLMBackbone("llava_onevision", model.eval(), processor, lm, image_features, parameter_groups, name,
                       vision_inputs=("image_sizes", "batch_num_images"))


def from_config(config: LlavaOnevisionConfig, processor=None, name: str = "") -> VLMBackbone:
    return wrap(LlavaOnevisionForConditionalGeneration(config), processor, name)


def from_pretrained(path: str | Path, *, dtype: torch.dtype | None = None) -> VLMBackbone:
    model = load_model(LlavaOnevisionForConditionalGeneration, path, dtype)
    images = load_part(LlavaOnevisionImageProcessorPil.from_pretrained, path, "image processor")
    tokenizer = load_part(AutoTokenizer.from_pretrained, path, "tokenizer")
    return wrap(model, processor(images, tokenizer, model.config), name=str(path))
