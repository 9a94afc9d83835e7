"""Idefics3 and SmolVLM: a SigLIP vision tower + a pixel-shuffle connector + a Llama LM, with image splitting.

SmolVLM (model_type "smolvlm", SmolVLM2) is transformers' copy of Idefics3 (model_type "idefics3"; the first SmolVLM
checkpoints are Idefics3 ones): the same modules under the same names, so one adapter serves both. The image
processor cuts an image into tiles of the vision tower's resolution (rows x cols, up to `size["longest_edge"]`) plus
one global view; the vision tower encodes every tile, the connector merges each scale_factor x scale_factor block of
patch features into one vector (pixel shuffle) and projects it, and each tile's `image_seq_len` features replace as
many `<image>` placeholders. `pixel_values` are (B, tiles, 3, H, W): rows with fewer tiles are padded with all-zero
tiles, which the model skips, so rows carry different numbers of features. The LM is the bare decoder
`model.model.text_model`, with the head on the outer model.

The processor is transformers' `Idefics3Processor` for both model types. `SmolVLMProcessor` lays out images exactly
as it does (same tokens, same expansion) but also requires a video processor, which needs torchvision, and the
`num2words` package; freevlm decodes images only, so it does not need either.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessorPil,
)

from freevlm.backbones.common import VLMBackbone, build_processor, load_model, load_part, read_model_type
from freevlm.backbones.lm import language_model_adapter
from freevlm.errors import FreeVLMError

# model_type -> (model class, PIL image processor class)
CLASSES = {
    "idefics3": (Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil),
    "smolvlm": (SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil),
}
# the tokens the processor writes around each tile's placeholders besides <image> and <fake_token_around_image> (which
# it adds to the tokenizer itself): a tokenizer should hold them as single tokens
LAYOUT_TOKENS = ["<global-img>"] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]


def image_features(model, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None,
                   **extra) -> torch.Tensor:
    """(sum over rows of tiles x image_seq_len, D): every real tile's features, row by row, tile by tile."""
    out = model.get_image_features(pixel_values, pixel_attention_mask, return_dict=True)
    return torch.cat(list(out.pooler_output), dim=0)


def image_seq_len(config) -> int:
    """Placeholders per tile: the tower's patches, merged scale_factor^2 to one by the pixel shuffle."""
    vision = config.vision_config
    return (vision.image_size // vision.patch_size) ** 2 // config.scale_factor**2


def parameter_groups(model) -> dict[str, list]:
    return {
        "vision": list(model.model.vision_model.parameters()),
        "projection": list(model.model.connector.parameters()),
        "lm": [*model.model.text_model.parameters(), *model.lm_head.parameters()],
    }


def wrap(model, processor: Idefics3Processor | None = None, name: str = "") -> VLMBackbone:
    lm = language_model_adapter(model.model.text_model, lm_head=model.lm_head)
    return VLMBackbone(model.config.model_type, model.eval(), processor, lm, image_features, parameter_groups, name,
                       image_prompt_template="<image>{}")


def from_config(config: Idefics3Config | SmolVLMConfig, processor: Idefics3Processor | None = None,
                name: str = "") -> VLMBackbone:
    return wrap(CLASSES[config.model_type][0](config), processor, name)


def from_pretrained(path: str | Path, *, dtype: torch.dtype | None = None) -> VLMBackbone:
    model_cls, image_processor_cls = CLASSES[read_model_type(path)]
    model = load_model(model_cls, path, dtype)
    processor = build_processor(
        Idefics3Processor,
        path,
        [load_part(image_processor_cls.from_pretrained, path, "image processor"),
         load_part(AutoTokenizer.from_pretrained, path, "tokenizer")],
        image_seq_len=image_seq_len(model.config),
    )
    check_processor(processor, model.config, path)
    return wrap(model, processor, name=str(path))


def check_processor(processor: Idefics3Processor, config, path) -> None:
    """The processor must cut tiles of the tower's resolution and give each as many placeholders as it has features."""
    want = image_seq_len(config)
    if processor.image_seq_len != want:
        raise FreeVLMError(f"{path}: the processor gives each image tile {processor.image_seq_len} placeholders but "
                           f"the model makes {want} features per tile (processor_config.json image_seq_len and "
                           "config.json disagree)")
    tile = (getattr(processor.image_processor, "max_image_size", None) or {}).get("longest_edge")
    if tile is not None and tile != config.vision_config.image_size:
        raise FreeVLMError(f"{path}: the image processor cuts {tile}-pixel tiles but the vision tower takes "
                           f"{config.vision_config.image_size} pixels (preprocessor max_image_size and config.json "
                           "disagree)")
    if processor.image_token_id != config.image_token_id:
        raise FreeVLMError(f"{path}: the tokenizer's <image> is id {processor.image_token_id} but config.json's "
                           f"image_token_id is {config.image_token_id}")


def make_processor(tokenizer, config: Idefics3Config | SmolVLMConfig, max_tiles_per_side: int = 2
                   ) -> Idefics3Processor:
    """A processor for a model built from config (the tiny models): tiles of the vision tower's resolution, images
    resized so that their longer side is `max_tiles_per_side` tiles. The tokenizer gains the layout tokens it lacks
    (`LAYOUT_TOKENS`; the processor itself adds `<fake_token_around_image>` and `<end_of_utterance>`), so the model's
    vocabulary must cover `len(tokenizer)` afterwards."""
    tile = config.vision_config.image_size
    image_processor_cls = CLASSES[config.model_type][1]
    image_processor = image_processor_cls(size={"longest_edge": max_tiles_per_side * tile},
                                          max_image_size={"longest_edge": tile})
    tokenizer.add_tokens([t for t in LAYOUT_TOKENS if t not in tokenizer.get_vocab()], special_tokens=True)
    return Idefics3Processor(image_processor, tokenizer, image_seq_len=image_seq_len(config))
