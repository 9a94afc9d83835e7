"""What freevlm needs from a vision-language model: the Protocols every backbone adapter satisfies.

Layer numbering, once for the whole project: the LM has `num_layers` = N decoder layers, numbered 1..N. "Layer i"
is the i-th layer counted from the embeddings, and "an exit at layer i" reads the hidden state *after* layer i
(h_i, the output of layer i). Layer N's output h_N is what the final norm and LM head turn into the model's own
prediction. Python storage is 0-based: layer i is `lm.layers[i - 1]`. For encoder-decoder LMs (FlanT5) the layers
are the *decoder* blocks; the encoder always runs whole, once per input.

A backbone splits into two halves:
- the vision side (`VisionLanguageBackbone`): turns images + prompt token ids into the LM's input embeddings,
  with image features scattered into the placeholder positions, exactly as the transformers model does;
- the language side (`LanguageModel`): the LM addressed one layer at a time through transformers' own modules (training,
  and the reference the decode engine's kernels are tested against; decoding runs on `generation/kernels`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from transformers import Cache, PretrainedConfig, PreTrainedModel


@dataclass
class LMInputs:
    """The LM's inputs for one batch of (image, prompt): what `generate` / a teacher-forced forward starts from."""

    inputs_embeds: torch.Tensor  # (B, P, D): prompt embeddings with image features in the placeholder slots
    attention_mask: torch.Tensor  # (B, P): 1 = real token, 0 = padding
    input_ids: torch.Tensor | None  # (B, P) placeholder ids, for decoder-only LMs (HF generate returns them)
    # (3, B, P) multimodal RoPE positions (temporal, height, width) of Qwen2-VL-style LMs; None: positions count the
    # real tokens (the same in every section). A generated token's position is one past the row's largest.
    position_ids: torch.Tensor | None = None


@dataclass
class LayerContext:
    """Everything a layer call needs besides its hidden states and cache, computed once per query-length group.

    All layers that process the same q query positions at the same cache length share one context, so the mask, the
    rotary embeddings and T5's relative position bias are built once, not once per layer.
    """

    attention_mask: torch.Tensor | None  # 4D additive/bool mask from transformers' mask utils, or None (sdpa causal)
    position_ids: torch.Tensor | None  # (B, q) positions of the query tokens
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None  # RoPE (cos, sin), Llama-family only
    position_bias: torch.Tensor | None = None  # (1, H, q, kv) T5 decoder self-attention bias, owned by block 0
    encoder_hidden_states: torch.Tensor | None = None  # (B, S, D) T5 encoder output, for every block's cross-attn
    encoder_attention_mask: torch.Tensor | None = None  # 4D mask over encoder positions

    def select_rows(self, rows: torch.Tensor) -> LayerContext:
        """The same context restricted to a subset of batch rows (for layers that only some rows still run)."""

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None or t.shape[0] == 1:
                return t  # broadcast over the batch
            return t[rows]

        pe = None if self.position_embeddings is None else tuple(pick(t) for t in self.position_embeddings)
        return LayerContext(
            attention_mask=pick(self.attention_mask),
            position_ids=pick(self.position_ids),
            position_embeddings=pe,
            position_bias=self.position_bias,
            encoder_hidden_states=pick(self.encoder_hidden_states),
            encoder_attention_mask=pick(self.encoder_attention_mask),
        )


@runtime_checkable
class LanguageModel(Protocol):
    """An LM addressed one decoder layer at a time. Implementations live in `backbones/lm.py`."""

    config: PretrainedConfig  # the LM's own transformers config (OPTConfig, LlamaConfig, T5Config)
    layers: nn.ModuleList  # the N decoder layers; layer i (1-based) is layers[i - 1]
    is_encoder_decoder: bool

    @property
    def num_layers(self) -> int: ...

    @property
    def hidden_size(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    def embed(
        self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None, position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None, past_length: int,
    ) -> torch.Tensor:
        """h_0 for the new tokens: token embeddings (+ learned positions for OPT). (B, q, D)"""
        ...

    def context(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, cache: Cache | None, layer_idx: int,
        position_ids: torch.Tensor | None, encoder: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    ) -> LayerContext:
        """The shared layer inputs for `hidden` (B, q, D) written at cache slot `layer_idx` (0-based)."""
        ...

    def run_layer(self, layer: nn.Module, hidden: torch.Tensor, ctx: LayerContext, cache: Cache | None) -> torch.Tensor:
        """One decoder layer (a backbone layer or an exit's replica) on (B, q, D); K/V go into `cache`."""
        ...

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from final-normed hidden states. (…, V)"""
        ...


@runtime_checkable
class VisionLanguageBackbone(Protocol):
    """A whole VLM: the transformers model, its processor pieces, and the LM adapter."""

    family: str  # "blip2", "instructblip", "llava"
    model: PreTrainedModel  # the transformers model (Blip2ForConditionalGeneration, ...)
    lm: LanguageModel

    def prepare(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None, **extra: torch.Tensor,
    ) -> LMInputs:
        """Images + tokenised prompts (with image placeholders) -> the LM's input embeddings. `image_features`:
        the images' features when already computed (the vision side is then skipped)."""
        ...

    def default_exit_layers(self) -> list[int]: ...

    def hf_generate(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
        **kwargs,
    ):
        """The transformers model's own `generate`, the reference every freevlm decode path is checked against."""
        ...
