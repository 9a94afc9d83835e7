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

from freevlm.backbones.common import VLMBackbone, load_model, load_part, read_model_type
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


class ImageTextProcessor:
    """Images + prompts -> Qwen2-VL's inputs, as transformers' `Qwen2VLProcessor` makes them for images. That class
    cannot be built without torchvision (its video processor needs it), so this one does the one thing it adds to the
    image processor and the tokenizer: each image placeholder becomes as many as the image has merged patches
    (t*h*w / merge^2). Expanded after tokenisation, on ids, so any tokenizer works (a word-level one included)."""

    def __init__(self, image_processor, tokenizer, image_token_id: int):
        self.image_processor = image_processor  # Qwen2VLImageProcessorPil
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.image_token = tokenizer.convert_ids_to_tokens(image_token_id)

    def image_prompt(self, prompt: str) -> str:
        """One image, then the prompt (between Qwen's vision markers where the vocabulary has them)."""
        start, end = "<|vision_start|>", "<|vision_end|>"
        if self.tokenizer.convert_tokens_to_ids(start) not in (None, self.tokenizer.unk_token_id):
            return f"{start}{self.image_token}{end}{prompt}"
        return f"{self.image_token} {prompt}"

    def __call__(self, images=None, text=None, padding: bool = True, return_tensors: str = "pt", **kwargs) -> dict:
        out = {}
        counts: list[int] = []
        if images is not None:
            vision = self.image_processor(images=images, return_tensors="pt")
            out.update(pixel_values=vision["pixel_values"], image_grid_thw=vision["image_grid_thw"])
            counts = (vision["image_grid_thw"].prod(-1) // self.image_processor.merge_size**2).tolist()
        if text is None:
            return out
        texts = [text] if isinstance(text, str) else list(text)
        rows, images_left = [], iter(counts)
        for ids in self.tokenizer(texts, **kwargs)["input_ids"]:
            row = []
            for t in ids:
                if t != self.image_token_id:
                    row.append(t)
                    continue
                n = next(images_left, None)
                if n is None:
                    raise FreeVLMError("the prompts hold more image placeholders than there are images")
                row.extend([t] * n)
            rows.append(row)
        if next(images_left, None) is not None:
            raise FreeVLMError("more images than image placeholders in the prompts")
        width = max(len(r) for r in rows)
        pad, left = self.tokenizer.pad_token_id, self.tokenizer.padding_side == "left"
        ids = [[pad] * (width - len(r)) + r if left else r + [pad] * (width - len(r)) for r in rows]
        mask = [[0] * (width - len(r)) + [1] * len(r) if left else [1] * len(r) + [0] * (width - len(r)) for r in rows]
        out["input_ids"] = torch.tensor(ids, dtype=torch.long)
        out["attention_mask"] = torch.tensor(mask, dtype=torch.long)
        out["mm_token_type_ids"] = (out["input_ids"] == self.image_token_id).int()
        return out

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def save_pretrained(self, path: str | Path) -> None:
        self.image_processor.save_pretrained(path)
        self.tokenizer.save_pretrained(path)


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
    processor = ImageTextProcessor(load_part(Qwen2VLImageProcessorPil.from_pretrained, path, "image processor"),
                                   load_part(AutoTokenizer.from_pretrained, path, "tokenizer"),
                                   model.config.image_token_id)
    return wrap(model, processor, name=str(path))
