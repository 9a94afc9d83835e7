"""Pieces the vision-side adapters share: scattering image features into placeholder slots, and loading checks."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from freevlm.backbones.base import LMInputs
from freevlm.backbones.lm import default_exit_layers
from freevlm.errors import FreeVLMError


def scatter_image_features(
    embeds: torch.Tensor, input_ids: torch.Tensor, image_token_id: int, features: torch.Tensor
) -> torch.Tensor:
    """Put image features into the placeholder positions, as the transformers VLMs do (masked_scatter, row-major).

    embeds (B, P, D), features (B, Q, D) or (B*Q, D); the prompt must hold exactly B*Q placeholder tokens.
    """
    mask = input_ids == image_token_id  # (B, P)
    n_slots, n_features = int(mask.sum()), features.numel() // features.shape[-1]
    if n_slots != n_features:
        raise FreeVLMError(
            f"prompt has {n_slots} image placeholder tokens (id {image_token_id}) but the vision side produced "
            f"{n_features} feature vectors; tokenise prompts with the backbone's processor"
        )
    return embeds.masked_scatter(mask.unsqueeze(-1), features.to(embeds.device, embeds.dtype))


def read_model_type(path: str | Path) -> str:
    """The `model_type` of a checkpoint folder, with one-line errors for the usual mistakes."""
    folder = Path(path)
    if not folder.exists():
        raise FreeVLMError(f"checkpoint folder not found: {folder}")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FreeVLMError(f"not a transformers checkpoint folder (no config.json): {folder}")
    try:
        return json.loads(config_file.read_text())["model_type"]
    except (json.JSONDecodeError, KeyError) as err:
        raise FreeVLMError(f"unreadable config {config_file}: {err!r}") from None


class VLMBackbone:
    """A transformers VLM, its processor, and its LM adapter: what every freevlm component is handed.

    The families differ only in how image features are made (`image_features`, supplied by `blip2.py`,
    `instructblip.py`, `llava.py`) and in where the LM sits inside the model (resolved once, into `lm`).
    """

    def __init__(self, family: str, model, processor, lm, image_features, parameter_groups, name: str = ""):
        self.family = family  # "blip2" / "instructblip" / "llava"
        self.model = model  # the transformers model (Blip2ForConditionalGeneration, ...)
        self.processor = processor  # the transformers processor (images + text -> model inputs), or None
        self.lm = lm  # DecoderOnlyLM / EncoderDecoderLM
        self._image_features = image_features  # (model, pixel_values, **extra) -> (B, Q, D) or (B*Q, D)
        self._parameter_groups = parameter_groups  # model -> {"vision"|"qformer"|"projection"|"lm": [params]}
        self.name = name or f"{family}-{lm.config.model_type}"

    def __repr__(self) -> str:
        lm = self.lm
        return f"VLMBackbone({self.name!r}, family={self.family}, lm={lm.config.model_type}, layers={lm.num_layers})"

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    def image_features(self, pixel_values: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        return self._image_features(self.model, pixel_values, **extra)

    def parameter_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        """The model's parameters by part: "vision", "qformer" (absent for LLaVA), "projection", "lm"."""
        return self._parameter_groups(self.model)

    def image_prompt(self, prompt: str) -> str:
        """The text a prompt becomes before the processor: LLaVA's processor expands an `<image>` marker in the
        text, the BLIP-2 family's processors prepend the query-token placeholders themselves."""
        return f"<image> {prompt}" if self.family == "llava" else prompt

    def prepare(self, pixel_values, input_ids, attention_mask=None, image_features=None, **extra):
        features = self.image_features(pixel_values, **extra) if image_features is None else image_features
        embeds = self.model.get_input_embeddings()(input_ids)
        embeds = scatter_image_features(embeds, input_ids, self.image_token_id, features)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        keep_ids = None if self.lm.is_encoder_decoder else input_ids
        return LMInputs(inputs_embeds=embeds, attention_mask=attention_mask, input_ids=keep_ids)

    def default_exit_layers(self) -> list[int]:
        return default_exit_layers(self.lm)

    def hf_generate(self, pixel_values, input_ids, attention_mask=None, **kwargs):
        return self.model.generate(
            pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, **kwargs
        )
