"""Llama family (Vicuna in MiniGPT-4 / InstructBLIP / LLaVA, SmolLM2, Mistral without a sliding window) and Qwen2
(Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision: the same layer with QKV biases; Qwen2-VL's multimodal RoPE comes from its
rotary module, see `rope`).

Mirrors `transformers.models.llama.modeling_llama.LlamaDecoderLayer`: RMSNorm in fp32, rotary embeddings from the
model's own `rotary_emb` module (so every RoPE scaling type transformers knows is honoured), grouped-query attention,
gated MLP. Reads the module's own parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from freevlm.generation.cache import Span, self_attention
from freevlm.generation.kernels.common import (
    KVStack,
    activation,
    linear,
    merge_heads,
    rms_norm,
    split_heads,
    tensor_state,
)


@dataclass
class LlamaLayer:
    ln1_w: torch.Tensor
    q_w: torch.Tensor
    q_b: torch.Tensor | None
    k_w: torch.Tensor
    k_b: torch.Tensor | None
    v_w: torch.Tensor
    v_b: torch.Tensor | None
    o_w: torch.Tensor
    o_b: torch.Tensor | None
    ln2_w: torch.Tensor
    gate_w: torch.Tensor
    gate_b: torch.Tensor | None
    up_w: torch.Tensor
    up_b: torch.Tensor | None
    down_w: torch.Tensor
    down_b: torch.Tensor | None
    eps1: float
    eps2: float


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaKernel:
    family = "llama"
    has_rope = True

    def __init__(self, lm):
        cfg = lm.config
        self.lm = lm
        self.hidden = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or self.hidden // self.heads
        self.scale = self.head_dim**-0.5
        self.act = activation(cfg.hidden_act)
        self.layers = [self.layer_weights(layer) for layer in lm.layers]
        self.embed_w = lm.embed_tokens.weight
        self.rotary = lm.rotary_emb
        # a position table can be built once per call unless the RoPE type rescales with the sequence length
        self.static_rope = getattr(self.rotary, "rope_type", "default") not in ("dynamic", "longrope")
        self.norm = (lm.norm.weight, lm.norm.variance_epsilon)
        self.head_w = lm.lm_head.weight
        # the last table built, reused by later calls: (what it was built for, length, cos, sin); replaced whole,
        # never written to, so a call holding an older one is unaffected
        self._table: tuple[tuple, int, torch.Tensor, torch.Tensor] | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].k_w.dtype

    @staticmethod
    def layer_weights(layer) -> LlamaLayer:
        a, m = layer.self_attn, layer.mlp
        return LlamaLayer(
            layer.input_layernorm.weight, a.q_proj.weight, a.q_proj.bias, a.k_proj.weight, a.k_proj.bias,
            a.v_proj.weight, a.v_proj.bias, a.o_proj.weight, a.o_proj.bias, layer.post_attention_layernorm.weight,
            m.gate_proj.weight, m.gate_proj.bias, m.up_proj.weight, m.up_proj.bias, m.down_proj.weight,
            m.down_proj.bias, layer.input_layernorm.variance_epsilon, layer.post_attention_layernorm.variance_epsilon,
        )

    # --- inputs --------------------------------------------------------------------------------------------------
    def embed(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return embeds  # positions enter through RoPE in every layer

    def embed_tokens(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.embed_w)

    def start(self, max_len: int, device: torch.device):
        """Once per call: the (cos, sin) table for every position a column up to `max_len` can hold (None when the
        RoPE type rescales with the sequence length: `rope` then asks the rotary module each time)."""
        if not self.static_rope:
            return None
        inv_freq = getattr(self.rotary, "inv_freq", None)
        built_for = (self.embed_w.dtype, torch.device(device), None if inv_freq is None else tensor_state(inv_freq))
        t = self._table
        if t is None or t[0] != built_for or t[1] < max_len:
            ids = torch.arange(max(max_len, 64), device=device)[None]
            with torch.no_grad():
                cos, sin = self.rotary(self.embed_w[:1], ids)
            t = self._table = (built_for, ids.shape[1], cos[0], sin[0])
        return t[2], t[3]

    def rope(self, positions: torch.Tensor, tables) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for position ids (R, q), each (R, q, hd), exactly as the model's rotary module computes them
        (elementwise position x inverse frequency, so a lookup in `start`'s table gives the same values). Padding's
        position -1 reads position 0. Multimodal RoPE prompts (Qwen2-VL) bring (3, R, q) positions, one per section;
        the rotary module mixes them (decoding's positions are equal in all sections: the table's values)."""
        positions = positions.clamp(min=0)
        if tables is None or positions.dim() == 3:  # (3, R, q) M-RoPE positions: the module mixes the sections
            with torch.no_grad():
                return self.rotary(self.embed_w[:1], positions)
        return tables[0][positions], tables[1][positions]

    def prepare(self, span: Span, tables) -> Span:
        span.rope = self.rope(span.positions, tables)
        return span

    def _apply_rope(self, x: torch.Tensor, rope) -> torch.Tensor:
        cos, sin = rope[0].unsqueeze(1), rope[1].unsqueeze(1)  # (R, 1, q, hd)
        return x * cos + rotate_half(x) * sin

    # --- one layer -----------------------------------------------------------------------------------------------
    def layer(self, w: LlamaLayer, x: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, span: Span,
              cross=None) -> torch.Tensor:
        h = rms_norm(x, w.ln1_w, w.eps1)
        q = self._apply_rope(split_heads(linear(h, w.q_w, w.q_b), self.head_dim), span.rope)
        k = self._apply_rope(split_heads(linear(h, w.k_w, w.k_b), self.head_dim), span.rope)
        v = split_heads(linear(h, w.v_w, w.v_b), self.head_dim)
        a = self_attention(q, k, v, cache_k, cache_v, span, self.scale)
        x = x + linear(merge_heads(a), w.o_w, w.o_b)
        h = rms_norm(x, w.ln2_w, w.eps2)
        return x + linear(self.act(linear(h, w.gate_w, w.gate_b)) * linear(h, w.up_w, w.up_b), w.down_w,
                            w.down_b)

    # --- propagation ---------------------------------------------------------------------------------------------
    def kv_stack(self, ws: list[LlamaLayer]) -> KVStack:
        return KVStack([w.ln1_w for w in ws], [None] * len(ws), [w.k_w for w in ws], [w.k_b for w in ws],
                       [w.v_w for w in ws], [w.v_b for w in ws], ws[0].eps1)

    def project_kv(self, stack: KVStack, lo: int, hi: int, state: torch.Tensor, rope=None):
        """state (R, D) -> K (with RoPE at the tokens' positions: rope = (cos, sin), (R, hd)), V: (hi-lo, R, H, hd)."""
        dtype = state.dtype
        h = state.float()
        n = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + stack.eps)).to(dtype)  # (R, D)
        n = stack.norm_w[lo:hi, None, :] * n[None]
        k, v = stack.project(n, lo, hi)
        shape = (hi - lo, state.shape[0], self.kv_heads, self.head_dim)
        k, v = k.reshape(shape), v.reshape(shape)
        cos, sin = rope[0][None, :, None], rope[1][None, :, None]  # (1, R, 1, hd)
        return k * cos + rotate_half(k) * sin, v

    # --- output --------------------------------------------------------------------------------------------------
    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, *self.norm)

    def logits(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """`weight`: rows of the head to score instead of all of them (a subset head, `vocab.py`)."""
        return linear(self.final_norm(x), self.head_w if weight is None else weight)
