"""T5 / FlanT5 decoder blocks (BLIP-2 FlanT5, InstructBLIP FlanT5): self-attention with relative position bias,
cross-attention over the encoder output, gated or plain feed-forward.

Mirrors `transformers.models.t5.modeling_t5.T5Block` for the decoder: no attention scaling, T5's RMS LayerNorm,
block 0's relative-bias table shared by every block (exit replicas included), `scale_decoder_outputs` before the
head. The encoder is not a kernel: it runs once per input through transformers' own module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from freevlm.generation.cache import Span, self_attention
from freevlm.generation.kernels.common import KVStack, activation, linear, merge_heads, rms_norm, split_heads


@dataclass
class T5Layer:
    ln1_w: torch.Tensor
    q_w: torch.Tensor
    k_w: torch.Tensor
    v_w: torch.Tensor
    o_w: torch.Tensor
    ln_cross_w: torch.Tensor
    cq_w: torch.Tensor
    ck_w: torch.Tensor
    cv_w: torch.Tensor
    co_w: torch.Tensor
    ln2_w: torch.Tensor
    wi_0: torch.Tensor | None  # gated feed-forward (FlanT5) ...
    wi_1: torch.Tensor | None
    wi: torch.Tensor | None  # ... or plain (T5 v1.0)
    wo: torch.Tensor
    eps: float


class T5Kernel:
    family = "t5"
    has_rope = False  # relative position bias, added to the self-attention scores
    static_rope = True

    def __init__(self, lm):
        cfg = lm.config
        self.lm = lm
        self.hidden = cfg.d_model
        self.heads = cfg.num_heads
        self.kv_heads = self.heads
        self.head_dim = cfg.d_kv
        self.gated = cfg.is_gated_act
        self.act = activation(cfg.dense_act_fn)
        self.layers = [self.layer_weights(block) for block in lm.layers]
        self.embed_w = lm.decoder.embed_tokens.weight
        self.bias_module = lm.decoder.block[0].layer[0].SelfAttention  # owner of the relative-bias table
        self.norm = (lm.decoder.final_layer_norm.weight, lm.decoder.final_layer_norm.variance_epsilon)
        self.head_w = lm.lm_head.weight
        self.output_scale = cfg.d_model**-0.5 if getattr(cfg, "scale_decoder_outputs", False) else None

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].k_w.dtype

    @staticmethod
    def layer_weights(block) -> T5Layer:
        sa, ca, ff = block.layer[0], block.layer[1], block.layer[2]
        d = ff.DenseReluDense
        gated = hasattr(d, "wi_0")
        return T5Layer(
            sa.layer_norm.weight, sa.SelfAttention.q.weight, sa.SelfAttention.k.weight, sa.SelfAttention.v.weight,
            sa.SelfAttention.o.weight, ca.layer_norm.weight, ca.EncDecAttention.q.weight, ca.EncDecAttention.k.weight,
            ca.EncDecAttention.v.weight, ca.EncDecAttention.o.weight, ff.layer_norm.weight,
            d.wi_0.weight if gated else None, d.wi_1.weight if gated else None, None if gated else d.wi.weight,
            d.wo.weight, sa.layer_norm.variance_epsilon,
        )

    # --- inputs --------------------------------------------------------------------------------------------------
    def embed(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return embeds

    def embed_tokens(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.embed_w)

    def start(self, max_len: int, device: torch.device) -> torch.Tensor:
        """The call's table: the decoder's relative bias for every (query, key) column pair, (H, T, T)."""
        with torch.no_grad():
            return self.bias_module.compute_bias(max_len, max_len, device=device)[0].to(self.dtype)

    def rope(self, positions: torch.Tensor, tables) -> None:
        return None

    def prepare(self, span: Span, tables: torch.Tensor) -> Span:
        """The additive self-attention mask: block 0's relative bias where attention is allowed, -inf elsewhere."""
        bias = tables[:, :, : span.kv_len]  # (H, T, kv)
        rows = span.cols.shape[0]
        if span.start is not None:
            b = bias[:, span.start : span.start + span.q][None]  # (1, H, q, kv)
        else:
            b = bias.permute(1, 0, 2)[span.cols]  # (R, q, H, kv)
            b = b.permute(0, 2, 1, 3)
        if span.mask is None:
            span.bias = b
        else:
            span.bias = b.masked_fill(~span.mask, float("-inf")) if b.shape[0] == rows else torch.where(
                span.mask, b, float("-inf"))
        return span

    def encoder_bias(self, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, S) 0/1 encoder mask -> additive (B, 1, 1, S)."""
        return torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device).masked_fill(
            attention_mask == 0, float("-inf"))[:, None, None, :]

    def cross_kv(self, w: T5Layer, encoder_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, D) encoder output -> this block's cross-attention K, V: (B, H, S, hd)."""
        return split_heads(linear(encoder_states, w.ck_w), self.head_dim), split_heads(
            linear(encoder_states, w.cv_w), self.head_dim)

    # --- one block -----------------------------------------------------------------------------------------------
    def layer(self, w: T5Layer, x: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, span: Span,
              cross=None) -> torch.Tensor:
        """cross = (K, V, additive mask) of this block's cross-attention, already restricted to the span's rows."""
        h = rms_norm(x, w.ln1_w, w.eps, t5=True)
        q = split_heads(linear(h, w.q_w), self.head_dim)
        k = split_heads(linear(h, w.k_w), self.head_dim)
        v = split_heads(linear(h, w.v_w), self.head_dim)
        a = self_attention(q, k, v, cache_k, cache_v, span, 1.0, additive=span.bias)
        x = x + linear(merge_heads(a), w.o_w)
        h = rms_norm(x, w.ln_cross_w, w.eps, t5=True)
        ck, cv, cmask = cross
        q = split_heads(linear(h, w.cq_w), self.head_dim)
        a = F.scaled_dot_product_attention(q, ck, cv, attn_mask=cmask, scale=1.0)
        x = x + linear(merge_heads(a), w.co_w)
        h = rms_norm(x, w.ln2_w, w.eps, t5=True)
        if self.gated:
            f = self.act(linear(h, w.wi_0)) * linear(h, w.wi_1)
        else:
            f = self.act(linear(h, w.wi))
        if f.dtype != w.wo.dtype:
            f = f.to(w.wo.dtype)
        return x + linear(f, w.wo)

    # --- propagation ---------------------------------------------------------------------------------------------
    def kv_stack(self, ws: list[T5Layer]) -> KVStack:
        return KVStack([w.ln1_w for w in ws], [None] * len(ws), [w.k_w for w in ws], [None] * len(ws),
                       [w.v_w for w in ws], [None] * len(ws), ws[0].eps)

    def project_kv(self, stack: KVStack, lo: int, hi: int, state: torch.Tensor, rope=None):
        h = state.float()
        n = state * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + stack.eps)
        w = stack.norm_w[lo:hi, None, :]
        n = w * (n.to(w.dtype) if w.dtype in (torch.float16, torch.bfloat16) else n)[None]
        k, v = stack.project(n, lo, hi)
        shape = (hi - lo, state.shape[0], self.kv_heads, self.head_dim)
        return k.reshape(shape), v.reshape(shape)

    # --- output --------------------------------------------------------------------------------------------------
    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, *self.norm, t5=True)

    def logits(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """`weight`: rows of the head to score instead of all of them (a subset head, `vocab.py`)."""
        x = self.final_norm(x)
        if self.output_scale is not None:
            x = x * self.output_scale
        return linear(x, self.head_w if weight is None else weight)
