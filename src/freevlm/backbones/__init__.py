"""Backbone adapters: a transformers VLM plus its LM addressed one layer at a time (see `base.py`)."""

from __future__ import annotations

from pathlib import Path

import torch

from freevlm.backbones import blip2, instructblip, llava
from freevlm.backbones.common import VLMBackbone, read_model_type
from freevlm.errors import FreeVLMError

_FAMILY_BY_MODEL_TYPE = {"blip-2": blip2, "instructblip": instructblip, "llava": llava}


def load_backbone(path: str | Path, *, dtype: torch.dtype | None = None, device: str | None = None) -> VLMBackbone:
    """A BLIP-2 / InstructBLIP / LLaVA checkpoint folder (a local copy, or anything `from_pretrained` reads)."""
    model_type = read_model_type(path)
    family = _FAMILY_BY_MODEL_TYPE.get(model_type)
    if family is None:
        known = ", ".join(sorted(_FAMILY_BY_MODEL_TYPE))
        raise FreeVLMError(f"{path} holds a {model_type!r} model; freevlm supports {known}")
    backbone = family.from_pretrained(path, dtype=dtype)
    if device is not None:
        backbone.model.to(device)
    return backbone


__all__ = ["VLMBackbone", "load_backbone"]
