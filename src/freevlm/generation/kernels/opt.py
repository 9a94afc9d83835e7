"""OPT (BLIP-2 OPT-2.7B / 6.7B, the embedded default): the decoder layer as plain functional torch.

Mirrors `transformers.models.opt.modeling_opt.OPTDecoderLayer` (pre- or post-LayerNorm, learned absolute positions
offset by 2, optional `project_in` / `project_out`), reading the module's own parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from freevlm.generation.cache import Span, self_attention
from freevlm.generation.kernels.common import KVStack, activation, linear, merge_heads, split_heads


@dataclass
class OPTLayer:
    ln1_w: torch.Tensor | None
    ln1_b: torch.Tensor | None
    q_w: torch.Tensor
    q_b: torch.Tensor | None
    k_w: torch.Tensor
    k_b: torch.Tensor | None
    v_w: torch.Tensor
    v_b: torch.Tensor | None
    o_w: torch.Tensor
    o_b: torch.Tensor | None
    ln2_w: torch.Tensor | None
    ln2_b: torch.Tensor | None
    fc1_w: torch.Tensor
    fc1_b: torch.Tensor | None
    fc2_w: torch.Tensor
    fc2_b: torch.Tensor | None
    eps1: float
    eps2: float


class OPTKernel:
    family = "opt"
    has_rope = False  # learned absolute positions, added once to the embeddings
    static_rope = True

    def __init__(self, lm):
        cfg = lm.config
        self.lm = lm
        self.hidden = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.kv_heads = self.heads
        self.head_dim = self.hidden // self.heads
        self.scale = self.head_dim**-0.5
        self.pre_norm = cfg.do_layer_norm_before
        self.act = activation(cfg.activation_function)
        self.layers = [self.layer_weights(layer) for layer in lm.layers]
        self.embed_w = lm.embed_tokens.weight
        self.pos_w = lm.embed_positions.weight
        self.pos_offset = lm.embed_positions.offset  # OPT's learned positions start at row 2
        self.project_in = lm.project_in
        self.project_out = lm.project_out
        norm = lm.norm
        self.norm = None if norm is None else (norm.weight, norm.bias, norm.eps)
        self.head_w = lm.lm_head.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].k_w.dtype

    @staticmethod
    def layer_weights(layer) -> OPTLayer:
        a, ln1, ln2 = layer.self_attn, layer.self_attn_layer_norm, layer.final_layer_norm
        return OPTLayer(ln1.weight, ln1.bias, a.q_proj.weight, a.q_proj.bias, a.k_proj.weight, a.k_proj.bias,
                        a.v_proj.weight, a.v_proj.bias, a.out_proj.weight, a.out_proj.bias, ln2.weight, ln2.bias,
                        layer.fc1.weight, layer.fc1.bias, layer.fc2.weight, layer.fc2.bias, ln1.eps, ln2.eps)

    # --- inputs --------------------------------------------------------------------------------------------------
    def embed(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, q, D_word) + learned positions -> h_0 (B, q, D)."""
        if self.project_in is not None:
            embeds = self.project_in(embeds)
        return embeds + F.embedding(positions + self.pos_offset, self.pos_w)

    def embed_tokens(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.embed(F.embedding(tokens, self.embed_w), positions)

    def start(self, max_len: int, device: torch.device) -> None:
        return None  # no per-call tables

    def prepare(self, span: Span, tables) -> Span:
        return span

    def rope(self, positions: torch.Tensor, tables) -> None:
        return None

    # --- one layer -----------------------------------------------------------------------------------------------
    def _norm(self, x, w, b, eps):
        return F.layer_norm(x, (self.hidden,), w, b, eps)

    def layer(self, w: OPTLayer, x: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, span: Span,
              cross=None) -> torch.Tensor:
        """x (R, q, D) -> (R, q, D); writes this layer's K/V for the span into cache_k / cache_v (B, H, T, hd)."""
        h = self._norm(x, w.ln1_w, w.ln1_b, w.eps1) if self.pre_norm else x
        q = split_heads(linear(h, w.q_w, w.q_b), self.head_dim)
        k = split_heads(linear(h, w.k_w, w.k_b), self.head_dim)
        v = split_heads(linear(h, w.v_w, w.v_b), self.head_dim)
        a = self_attention(q, k, v, cache_k, cache_v, span, self.scale)
        x = x + linear(merge_heads(a), w.o_w, w.o_b)
        if not self.pre_norm:
            x = self._norm(x, w.ln1_w, w.ln1_b, w.eps1)
        h = self._norm(x, w.ln2_w, w.ln2_b, w.eps2) if self.pre_norm else x
        x = x + linear(self.act(linear(h, w.fc1_w, w.fc1_b)), w.fc2_w, w.fc2_b)
        return x if self.pre_norm else self._norm(x, w.ln2_w, w.ln2_b, w.eps2)

    # --- propagation: skipped layers' K/V from one state, all layers at once --------------------------------------
    def kv_stack(self, ws: list[OPTLayer]) -> KVStack:
        return KVStack([w.ln1_w for w in ws], [w.ln1_b for w in ws], [w.k_w for w in ws], [w.k_b for w in ws],
                       [w.v_w for w in ws], [w.v_b for w in ws], ws[0].eps1)

    def project_kv(self, stack: KVStack, lo: int, hi: int, state: torch.Tensor, rope=None):
        """state (R, D) -> K, V (hi-lo, R, H, hd): what layers lo..hi-1 of `stack` would store for it."""
        if self.pre_norm:
            n = F.layer_norm(state, (self.hidden,), None, None, stack.eps)  # (R, D)
            n = n[None] * stack.norm_w[lo:hi, None, :]
            if stack.norm_b is not None:
                n = n + stack.norm_b[lo:hi, None, :]
        else:
            n = state[None].expand(hi - lo, *state.shape)
        k, v = stack.project(n, lo, hi)
        shape = (hi - lo, state.shape[0], self.kv_heads, self.head_dim)
        return k.reshape(shape), v.reshape(shape)

    # --- output --------------------------------------------------------------------------------------------------
    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            x = F.layer_norm(x, (self.hidden,), *self.norm)
        if self.project_out is not None:
            x = self.project_out(x)
        return x

    def logits(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """`weight`: rows of the head to score instead of all of them (a subset head, `vocab.py`)."""
        return linear(self.final_norm(x), self.head_w if weight is None else weight)
