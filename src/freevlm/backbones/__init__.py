"""Backbone adapters: a transformers VLM plus its LM addressed one layer at a time (see `base.py`)."""

from __future__ import annotations

from pathlib import Path

import torch

from freevlm.backbones import blip2, idefics3, instructblip, llava, llava_onevision, qwen2_vl
from freevlm.backbones.common import VLMBackbone, check_checkpoint_folder, read_model_type
from freevlm.errors import FreeVLMError

_FAMILY_BY_MODEL_TYPE = {"blip-2": blip2, "instructblip": instructblip, "llava": llava,
                         "qwen2_vl": qwen2_vl, "qwen2_5_vl": qwen2_vl, "llava_onevision": llava_onevision,
                         "idefics3": idefics3, "smolvlm": idefics3}


def check_backbone(path: str | Path) -> str:
    """The folder's model_type, after checking from the files alone (no weights read) that it can be loaded: a cheap
    check commands run before any work; `load_backbone` runs it too."""
    model_type = read_model_type(path)
    if model_type not in _FAMILY_BY_MODEL_TYPE:
        known = ", ".join(sorted(_FAMILY_BY_MODEL_TYPE))
        raise FreeVLMError(f"{path} holds a {model_type!r} model; freevlm supports {known}")
    check_checkpoint_folder(path, model_type)
    return model_type


def load_backbone(path: str | Path, *, dtype: torch.dtype | None = None, device: str | None = None) -> VLMBackbone:
    """A BLIP-2 / InstructBLIP / LLaVA / Qwen2-VL / Qwen2.5-VL / LLaVA-OneVision / Idefics3 / SmolVLM checkpoint
    folder (a local copy), checked end to end (see `common.py`)."""
    family = _FAMILY_BY_MODEL_TYPE[check_backbone(path)]
    backbone = family.from_pretrained(path, dtype=dtype)
    if device is not None:
        backbone.model.to(device)
    return backbone


__all__ = ["VLMBackbone", "check_backbone", "load_backbone"]
