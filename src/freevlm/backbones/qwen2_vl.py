"""Qwen2-VL and Qwen2.5-VL: a native-resolution ViT (patches merged 2x2) + a Qwen2 LM with multimodal RoPE (M-RoPE).

The two differ only on the vision side (Qwen2.5-VL: window attention, RMSNorm, SwiGLU), which transformers' own
`get_image_features` runs; the LM is the same Qwen2 decoder (QKV biases, grouped-query attention). Images of any size
are patchified by the image processor into one flat `pixel_values` (all images' patches, (sum_i t*h*w, C*T*P*P)) with
`image_grid_thw` (one (t, h, w) per image), so a batch may hold images of different sizes; each image takes
t*h*w / merge^2 `<|image_pad|>` placeholders.

M-RoPE: every prompt token has a 3-D position (temporal, height, width); text tokens have equal ones, image tokens
their place in the merged patch grid (transformers' `get_rope_index`). `prepare` returns them as
`LMInputs.position_ids` (3, B, P); a generated token's position is one past the prompt's largest, the same in all
three sections (transformers' `rope_deltas`), so decoding is 1-D RoPE with a per-row offset, which the engine takes
from these position ids. Videos are not supported (images only).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from freevlm.backbones.common import ImageTextProcessor, VLMBackbone, load_model, load_part, read_model_type
from freevlm.backbones.lm import language_model_adapter
from freevlm.errors import FreeVLMError

CLASSES = {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}


def _grid(image_grid_thw: torch.Tensor | None) -> torch.Tensor:
    if image_grid_thw is None:
        raise FreeVLMError("Qwen2-VL images need their image_grid_thw (the image processor's output beside "
                           "pixel_values); tokenise prompts with the backbone's processor")
    return image_grid_thw


def image_features(model, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None, **extra
                   ) -> torch.Tensor:
    out = model.model.get_image_features(pixel_values, _grid(image_grid_thw), return_dict=True)
    return torch.cat(list(out.pooler_output), dim=0)  # (sum of every image's merged patches, D)


def mm_token_types(model, input_ids: torch.Tensor) -> torch.Tensor:
    """transformers' `mm_token_type_ids` (1 at image placeholders, 0 elsewhere), from the ids themselves: a prompt
    with targets appended (training) keeps the types right."""
    return (input_ids == model.config.image_token_id).int()


def rope_index(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               image_grid_thw: torch.Tensor | None = None, **extra) -> torch.Tensor:
    """(3, B, P) M-RoPE position ids of the prompt tokens, exactly as transformers computes them (padding: 0)."""
    if extra.get("pixel_values_videos") is not None or extra.get("video_grid_thw") is not None:
        raise FreeVLMError("freevlm runs Qwen2-VL on images only; videos (pixel_values_videos) are not supported")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    with torch.no_grad():
        positions, _ = model.model.get_rope_index(
            input_ids, mm_token_type_ids=mm_token_types(model, input_ids), image_grid_thw=_grid(image_grid_thw),
            attention_mask=attention_mask,
        )
    return positions


def generate_inputs(model, input_ids: torch.Tensor, extra: dict) -> dict:
    """The extra inputs transformers' `generate` needs: the token types it computes M-RoPE from."""
    return {**extra, "mm_token_type_ids": mm_token_types(model, input_ids)}


def tokens_per_image(image_processor, vision: dict) -> list[int]:
    """Placeholders per image: its merged patches (t*h*w / merge^2), as `Qwen2VLProcessor` counts them."""
    return (vision["image_grid_thw"].prod(-1) // image_processor.merge_size**2).tolist()


def image_prompt(tokenizer, image_token: str, prompt: str) -> str:
    """One image, then the prompt: between Qwen's vision markers where the vocabulary has them."""
    start, end = "<|vision_start|>", "<|vision_end|>"
    if tokenizer.convert_tokens_to_ids(start) not in (None, tokenizer.unk_token_id):
        return f"{start}{image_token}{end}{prompt}"
    return f"{image_token} {prompt}"


def processor(image_processor, tokenizer, image_token_id: int) -> ImageTextProcessor:
    """What transformers' `Qwen2VLProcessor` does for images (it cannot be built without torchvision, which its video
    processor needs): see `ImageTextProcessor`."""
    return ImageTextProcessor(image_processor, tokenizer, image_token_id, tokens_per_image, image_prompt,
                              token_types=True)


def parameter_groups(model) -> dict[str, list]:
    merger = model.model.visual.merger
    merger_ids = {id(p) for p in merger.parameters()}
    return {
        "vision": [p for p in model.model.visual.parameters() if id(p) not in merger_ids],
        "projection": list(merger.parameters()),
        "lm": [*model.model.language_model.parameters(), *model.lm_head.parameters()],
    }


def wrap(model, processor=None, name: str = "") -> VLMBackbone:
    lm = language_model_adapter(model.model.language_model, lm_head=model.lm_head)
    return VLMBackbone(model.config.model_type, model.eval(), processor, lm, image_features, parameter_groups, name,
                       rope_index=rope_index, generate_inputs=generate_inputs, vision_inputs=("image_grid_thw",))


def from_config(config: Qwen2VLConfig | Qwen2_5_VLConfig, processor=None, name: str = "") -> VLMBackbone:
    return wrap(CLASSES[config.model_type](config), processor, name)


def from_pretrained(path: str | Path, *, dtype: torch.dtype | None = None) -> VLMBackbone:
    model = load_model(CLASSES[read_model_type(path)], path, dtype)
    images = load_part(Qwen2VLImageProcessorPil.from_pretrained, path, "image processor")
    tokenizer = load_part(AutoTokenizer.from_pretrained, path, "tokenizer")
    return wrap(model, processor(images, tokenizer, model.config.image_token_id), name=str(path))
