"""What every family's kernel shares: the interface the engine calls (`DecoderKernel`), activations, stacked K/V
projections for propagation, the exit kernels.

Kernels read the weights of the loaded transformers modules: they hold the `nn.Parameter` objects themselves, so an
optimizer step, `load_state_dict` or `.to()` on the modules is seen at the next call (dtype and device included: they
are read off the parameters at use). The one derived tensor is `KVStack`, the K/V projection weights of several layers
stacked so that propagating a token into all the layers it skipped is one batched matmul; it is rebuilt whenever a
source parameter changes: in place (torch's version counter) or by a new storage (`.to(dtype / device)` swaps a
parameter's data without touching its version counter, hence `tensor_state`).

A kernel is shared by every engine on its LM (it is cached on the adapter), so it holds no per-call state: what a call
needs (RoPE tables, T5's relative bias) is returned by `start` and owned by the engine that asked for it.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from freevlm.generation.cache import Span


def activation(name: str):
    """A plain function for transformers' activation `name` (a module call costs more than the op on tiny LMs)."""
    # only where the plain op is exactly what transformers computes (NewGELU's formula differs from F.gelu's tanh
    # approximation by ~1e-6, so FlanT5's "gelu_new" keeps transformers' own module)
    fast = {"relu": F.relu, "silu": F.silu, "swish": F.silu, "gelu": F.gelu,
            "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}
    return fast.get(name) or ACT2FN[name]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except that one token of one row is a matrix-vector product: on CPU `addmv` on the row-major weight is
    2-3x faster than the `addmm` F.linear dispatches to (3.6 vs 10.5 us for 128x128 here), and batch-1 decoding is
    nothing but such products."""
    if x.dim() == 3 and x.shape[0] == 1 and x.shape[1] == 1:
        v = x.view(-1)
        y = torch.mv(weight, v) if bias is None else torch.addmv(bias, weight, v)
        return y.view(1, 1, -1)
    return F.linear(x, weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, t5: bool = False) -> torch.Tensor:
    """Llama's RMSNorm (computed in fp32, cast back before the weight) or T5's (cast after, for half weights)."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if t5:
        return weight * (h.to(weight.dtype) if weight.dtype in (torch.float16, torch.bfloat16) else h)
    return weight * h.to(dtype)


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    b, q, _ = x.shape
    return x.view(b, q, -1, head_dim).transpose(1, 2)  # (B, H, q, hd)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, q, hd = x.shape
    return x.transpose(1, 2).reshape(b, q, h * hd)


def tensor_state(t: torch.Tensor) -> tuple:
    """What a tensor derived from `t` must be rebuilt on: its in-place version counter, and its storage (address,
    dtype, device), which `.to()` and `.data = ...` change while keeping the parameter object and its version."""
    return t._version, t.data_ptr(), t.dtype, t.device


class KVStack:
    """The input norm and K/V projections of a run of layers, stacked: (L, 2*H_kv*hd, D) and friends.

    `sources` are the parameters copied in; `fresh()` tells whether they are unchanged since (same version counters,
    same storages: a stack built before `.to(torch.bfloat16)` is stale after it).
    """

    def __init__(self, norm_w, norm_b, k_w, k_b, v_w, v_b, eps: float):
        self.sources = [t for group in (norm_w, norm_b, k_w, k_b, v_w, v_b) for t in group if t is not None]
        self.states = [tensor_state(t) for t in self.sources]
        with torch.no_grad():
            self.norm_w = torch.stack([t.detach() for t in norm_w])  # (L, D)
            self.norm_b = None if norm_b[0] is None else torch.stack([t.detach() for t in norm_b])
            self.w = torch.cat([torch.stack([t.detach() for t in k_w]), torch.stack([t.detach() for t in v_w])], 1)
            self.b = None
            if k_b[0] is not None:
                self.b = torch.cat([torch.stack([t.detach() for t in k_b]), torch.stack([t.detach() for t in v_b])], 1)
        self.eps = eps
        self.kv_dim = k_w[0].shape[0]

    def fresh(self) -> bool:
        return [tensor_state(t) for t in self.sources] == self.states

    def project(self, normed: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """normed (L', R, D) already through each layer's norm -> K, V (L', R, H_kv*hd) for layers lo..hi-1."""
        w = self.w[lo:hi]  # (L', 2K, D)
        out = torch.bmm(normed, w.transpose(1, 2)) if self.b is None else torch.baddbmm(
            self.b[lo:hi, None, :], normed, w.transpose(1, 2))
        return out[..., : self.kv_dim], out[..., self.kv_dim :]


@runtime_checkable
class DecoderKernel(Protocol):
    """What the decode engine (`engine.py`, with `kv.py`, `graphs.py`, `speculative.py`, `bounds.py`) calls on a
    family's kernel: one implementation per LM family (`opt.py`, `llama.py`, `t5.py`), picked by `kernel_for`.

    The engine never asks which family it runs: whatever differs (positions, RoPE, T5's bias) is behind these calls.
    A kernel is shared by every engine on its LM and keeps no per-call state: `start` returns the call's tables, and
    the engine hands them back to `prepare` / `rope`.
    """

    heads: int  # attention heads
    kv_heads: int  # K/V heads (fewer than `heads` under grouped-query attention)
    head_dim: int
    layers: list  # the decoder layers' weights, as `layer_weights` gives them (index l-1 = layer l)
    head_w: torch.Tensor  # the LM head's weight (V, D): a subset head (`vocab.py`) scores some of its rows
    has_rope: bool  # positions enter as rotary embeddings in every layer (`rope` gives them; exit events keep them)
    static_rope: bool  # `start`'s RoPE table serves every position of the call (False: RoPE rescaled by length)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the K/V the layers write, i.e. of the KV cache: the weights', whatever the inputs'."""
        ...

    def layer_weights(self, module) -> Any:
        """A decoder layer module (the LM's, or an exit transformer's replica) -> its weights for `layer`."""
        ...

    def embed(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings (B, q, D_word) at position ids (B, q) -> h_0 (B, q, D)."""
        ...

    def embed_tokens(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Token ids (B, q) at position ids (B, q) -> h_0 (B, q, D)."""
        ...

    def start(self, max_len: int, device: torch.device) -> Any:
        """Once per decode call: the call's tables for columns up to `max_len` (RoPE, T5's relative bias, or None).
        The caller owns them and passes them to `prepare` and `rope`."""
        ...

    def prepare(self, span: Span, tables: Any) -> Span:
        """What every layer needs for `span` besides its mask (RoPE cos/sin, T5's additive bias), set on it."""
        ...

    def rope(self, positions: torch.Tensor, tables: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(cos, sin) (R, q, hd) at position ids (R, q); None where the family has no rotary embeddings."""
        ...

    def layer(self, w: Any, x: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, span: Span,
              cross=None) -> torch.Tensor:
        """One decoder layer over x (R, q, D); writes its K/V for the span into cache_k / cache_v (B, H, T, hd).
        `cross`: encoder-decoder LMs' (K, V, additive mask) for cross-attention, else None."""
        ...

    def kv_stack(self, ws: list) -> KVStack:
        """The input norms and K/V projections of layers `ws`, stacked for `project_kv`."""
        ...

    def project_kv(self, stack: KVStack, lo: int, hi: int, state: torch.Tensor,
                   rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """state (R, D) -> the K, V (hi-lo, R, H_kv, hd) layers lo..hi-1 of `stack` would write for it (`rope`:
        (cos, sin) (R, hd) at the tokens' positions, for kernels with `has_rope`)."""
        ...

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        ...

    def logits(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """(R, D) -> (R, V) through the final norm and the head (`weight`: some of its rows instead)."""
        ...


@runtime_checkable
class EncoderDecoderKernel(DecoderKernel, Protocol):
    """The kernel of an encoder-decoder LM (T5): the decoder's layers also cross-attend to the encoder output."""

    def encoder_bias(self, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, S) 0/1 encoder mask -> additive (B, 1, 1, S)."""
        ...

    def cross_kv(self, w: Any, encoder_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, D) encoder output -> layer `w`'s cross-attention K, V: (B, H, S, hd)."""
        ...


class ExitKernel:
    """How the engine runs one exit: its transformer layer (FREE), if any, and its classifier."""

    def __init__(self, module, kernel: DecoderKernel, slot: int):
        self.kind = module.kind  # "transformer" | "linear" | "frozen-head"
        self.slot = slot  # index in the exit cache (transformer exits only)
        self.layer = kernel.layer_weights(module.layer) if self.kind == "transformer" else None
        self.classifier = module.classifier.weight if self.kind == "linear" else None
        self.uses_cache = self.kind == "transformer"

    def logits(self, kernel: DecoderKernel, state: torch.Tensor, subset=None) -> torch.Tensor:
        """(R, V) logits, or (R, K) over the token ids of `subset` (a `HeadSubset`: its rows of the classifier)."""
        if self.classifier is not None:
            w = self.classifier if subset is None else subset.rows(self.classifier)
            return F.linear(kernel.final_norm(state), w)
        return kernel.logits(state) if subset is None else kernel.logits(state, subset.rows(kernel.head_w))
