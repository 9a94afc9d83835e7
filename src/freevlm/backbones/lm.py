"""The language side of a backbone, addressed one decoder layer at a time.

Two implementations of the `LanguageModel` protocol (see `base.py` for the layer numbering):
- `DecoderOnlyLM`: OPT (learned absolute positions added to the embeddings) and Llama-family LMs (Llama, Vicuna,
  Mistral, SmolLM2: rotary embeddings applied inside every attention layer);
- `EncoderDecoderLM`: T5 / FlanT5. Exits live on the *decoder* blocks. Only decoder block 0 owns the relative
  position bias table, and every block cross-attends to the encoder output, so `context()` computes block 0's bias
  and hands it, with the encoder states and mask, to any block run outside the stack (exits included).

Both hold references to the transformers modules (nothing is copied) and call them exactly as the transformers stack
does, with transformers' own mask utilities and `Cache` classes. Training runs through them (so exits train on the
states transformers computes), and so does the reference the decode engine (`generation/kernels`, on the same
parameters) is tested against.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Cache, EncoderDecoderCache, PretrainedConfig
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

from freevlm.backbones.base import LayerContext


def _past_length(cache: Cache | None, layer_idx: int) -> int:
    if cache is None:
        return 0
    if isinstance(cache, EncoderDecoderCache):
        cache = cache.self_attention_cache
    return cache.get_seq_length(layer_idx)


class DecoderOnlyLM:
    """An OPT or Llama-family causal LM, one layer at a time."""

    is_encoder_decoder = False

    def __init__(
        self,
        config: PretrainedConfig,
        embed_tokens: nn.Embedding,
        layers: nn.ModuleList,
        norm: nn.Module | None,
        lm_head: nn.Linear,
        *,
        embed_positions: nn.Module | None = None,  # OPT's learned positions (added once, to the embeddings)
        rotary_emb: nn.Module | None = None,  # Llama's RoPE (applied in every layer)
        project_in: nn.Module | None = None,  # OPT-350m style word_embed_proj_dim != hidden_size
        project_out: nn.Module | None = None,
    ):
        if (embed_positions is None) == (rotary_emb is None):
            raise ValueError("a decoder-only LM has exactly one of learned positions (OPT) or rotary embeddings")
        self.config = config
        self.embed_tokens = embed_tokens
        self.layers = layers
        self.norm = norm
        self.lm_head = lm_head
        self.embed_positions = embed_positions
        self.rotary_emb = rotary_emb
        self.project_in = project_in
        self.project_out = project_out

    @classmethod
    def from_opt(cls, lm: nn.Module) -> DecoderOnlyLM:
        dec = lm.model.decoder
        return cls(
            lm.config, dec.embed_tokens, dec.layers, dec.final_layer_norm, lm.lm_head,
            embed_positions=dec.embed_positions, project_in=dec.project_in, project_out=dec.project_out,
        )

    @classmethod
    def from_llama(cls, model: nn.Module, lm_head: nn.Linear) -> DecoderOnlyLM:
        """`model` is the bare decoder (LlamaModel or similar: embed_tokens, layers, norm, rotary_emb)."""
        return cls(model.config, model.embed_tokens, model.layers, model.norm, lm_head, rotary_emb=model.rotary_emb)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.lm_head.out_features

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads

    def embed(self, input_ids, inputs_embeds, position_ids, attention_mask, past_length):
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if self.embed_positions is None:
            return inputs_embeds  # Llama: positions enter through RoPE in every layer
        # OPT: positions follow the 2D mask (left padding shifts them), exactly as OPTDecoder computes them
        b, q = inputs_embeds.shape[:2]
        full_mask = attention_mask
        if full_mask is None:
            full_mask = torch.ones(b, past_length + q, device=inputs_embeds.device, dtype=torch.long)
        if position_ids is None:
            position_ids = (torch.cumsum(full_mask, dim=1) * full_mask - 1).long()[:, past_length:]
        if self.project_in is not None:
            inputs_embeds = self.project_in(inputs_embeds)
        positions = self.embed_positions(full_mask, past_length, position_ids=position_ids)
        return inputs_embeds + positions.to(inputs_embeds.device)

    def default_position_ids(self, hidden: torch.Tensor, past_length: int) -> torch.Tensor:
        return (torch.arange(hidden.shape[1], device=hidden.device) + past_length).unsqueeze(0)

    def context(self, hidden, attention_mask, cache, layer_idx, position_ids, encoder=None):
        past = _past_length(cache, layer_idx)
        if self.rotary_emb is None:
            mask = create_causal_mask(
                config=self.config, inputs_embeds=hidden, attention_mask=attention_mask, past_key_values=cache,
                layer_idx=layer_idx,
            )
            return LayerContext(attention_mask=mask, position_ids=position_ids)
        if position_ids is None:
            position_ids = self.default_position_ids(hidden, past)
        # (3, B, q) M-RoPE positions (Qwen2-VL) only enter the rotary embedding; the mask reads none, as transformers'
        text_positions = position_ids if position_ids.dim() == 2 else None
        mask = create_causal_mask(
            config=self.config, inputs_embeds=hidden, attention_mask=attention_mask, past_key_values=cache,
            position_ids=text_positions, layer_idx=layer_idx,
        )
        return LayerContext(
            attention_mask=mask, position_ids=text_positions,
            position_embeddings=self.rotary_emb(hidden, position_ids),
        )

    def run_layer(self, layer, hidden, ctx, cache):
        kwargs = {}
        if ctx.position_embeddings is not None:
            kwargs["position_embeddings"] = ctx.position_embeddings
        return layer(
            hidden, attention_mask=ctx.attention_mask, position_ids=ctx.position_ids, past_key_values=cache, **kwargs
        )

    def final_norm(self, hidden):
        if self.norm is not None:
            hidden = self.norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        return hidden

    def head(self, hidden):
        return self.lm_head(hidden)

    def modules(self) -> list[nn.Module]:
        parts = [self.embed_tokens, self.layers, self.norm, self.lm_head, self.embed_positions, self.rotary_emb,
                 self.project_in, self.project_out]
        return [m for m in parts if m is not None]


class EncoderDecoderLM:
    """A T5 / FlanT5 LM whose decoder blocks run one at a time; the encoder runs whole."""

    is_encoder_decoder = True

    def __init__(self, lm: nn.Module):
        self.lm = lm  # T5ForConditionalGeneration
        self.config = lm.config
        self.decoder = lm.decoder
        self.encoder = lm.encoder
        self.layers = lm.decoder.block
        self.lm_head = lm.lm_head
        self._bias_attention = lm.decoder.block[0].layer[0].SelfAttention  # the one owner of the relative bias

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return self.config.d_model

    @property
    def vocab_size(self) -> int:
        return self.lm_head.out_features

    def encode(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.encoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state

    def embed(self, input_ids, inputs_embeds, position_ids, attention_mask, past_length):
        if inputs_embeds is None:
            inputs_embeds = self.decoder.embed_tokens(input_ids)
        return self.decoder.dropout(inputs_embeds)

    def context(self, hidden, attention_mask, cache, layer_idx, position_ids, encoder=None):
        self_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
        past = _past_length(cache, layer_idx)
        mask = create_causal_mask(
            config=self.decoder.config, inputs_embeds=hidden, attention_mask=attention_mask,
            past_key_values=self_cache, layer_idx=layer_idx,
        )
        q = hidden.shape[1]
        bias = self._bias_attention.compute_bias(q, past + q, device=hidden.device, past_seen_tokens=past)
        enc_states, enc_mask = encoder if encoder is not None else (None, None)
        enc_mask4 = None
        if enc_states is not None:
            enc_mask4 = create_bidirectional_mask(
                config=self.decoder.config, inputs_embeds=hidden, attention_mask=enc_mask,
                encoder_hidden_states=enc_states,
            )
        return LayerContext(
            attention_mask=mask, position_ids=position_ids, position_bias=bias.to(hidden.dtype),
            encoder_hidden_states=enc_states, encoder_attention_mask=enc_mask4,
        )

    def run_layer(self, layer, hidden, ctx, cache):
        out = layer(
            hidden, ctx.attention_mask, ctx.position_bias, ctx.encoder_hidden_states, ctx.encoder_attention_mask,
            None, past_key_values=cache,
        )
        return out[0]

    def final_norm(self, hidden):
        return self.decoder.dropout(self.decoder.final_layer_norm(hidden))

    def head(self, hidden):
        if getattr(self.config, "scale_decoder_outputs", False):
            hidden = hidden * (self.config.d_model**-0.5)
        return self.lm_head(hidden)

    def modules(self) -> list[nn.Module]:
        return [self.lm]


# The paper's exit placements (Table 10), for the LM sizes it used. Other depths scale these placements
# proportionally: layer l of an N_ref-layer LM maps to round(l * N / N_ref), clamped to 1..N-1, duplicates dropped.
# Llama-family LMs (MiniGPT-4's Vicuna, LLaVA) have no placement in the paper; they use OPT-2.7B's (both have 32
# layers at 7B/2.7B scale), which is a choice of ours, not the paper's.
PAPER_EXIT_LAYERS = {
    "decoder-only": (32, (3, 6, 9, 12, 24, 27, 30)),  # OPT-2.7B
    "encoder-decoder": (24, (3, 5, 7, 9, 12, 20, 22)),  # FlanT5-XL decoder
}


def default_exit_layers(lm: DecoderOnlyLM | EncoderDecoderLM) -> list[int]:
    """The paper's exit layers for this LM's depth (1-based, exit after layer i)."""
    ref_depth, ref_layers = PAPER_EXIT_LAYERS["encoder-decoder" if lm.is_encoder_decoder else "decoder-only"]
    n = lm.num_layers
    scaled = sorted({min(max(round(layer * n / ref_depth), 1), n - 1) for layer in ref_layers})
    return [layer for layer in scaled if 1 <= layer < n]


def language_model_adapter(language_model: nn.Module, lm_head: nn.Linear | None = None):
    """Wrap a transformers LM in the matching adapter.

    `language_model` is what a VLM holds: OPTForCausalLM / LlamaForCausalLM / T5ForConditionalGeneration, or a bare
    decoder (LLaVA holds a LlamaModel and keeps `lm_head` on the outer model; pass it as `lm_head`).
    """
    if getattr(language_model.config, "is_encoder_decoder", False):
        return EncoderDecoderLM(language_model)
    if hasattr(language_model, "model") and hasattr(language_model.model, "decoder"):
        return DecoderOnlyLM.from_opt(language_model)
    if lm_head is None:
        return DecoderOnlyLM.from_llama(language_model.model, language_model.lm_head)
    return DecoderOnlyLM.from_llama(language_model, lm_head)
