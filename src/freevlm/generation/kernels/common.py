"""What every family's kernel shares: activations, stacked K/V projections for propagation, the exit kernels.

Kernels read the weights of the loaded transformers modules: they hold the `nn.Parameter` objects themselves, so an
optimizer step, `load_state_dict` or `.to()` on the modules is seen at the next call. The one derived tensor is
`KVStack`, the K/V projection weights of several layers stacked so that propagating a token into all the layers it
skipped is one batched matmul; it is rebuilt whenever a source parameter changes (torch's in-place version counter).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN


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


class KVStack:
    """The input norm and K/V projections of a run of layers, stacked: (L, 2*H_kv*hd, D) and friends.

    `sources` are the parameters copied in; `fresh()` tells whether they are unchanged since (same version counters).
    """

    def __init__(self, norm_w, norm_b, k_w, k_b, v_w, v_b, eps: float):
        self.sources = [t for group in (norm_w, norm_b, k_w, k_b, v_w, v_b) for t in group if t is not None]
        self.versions = [t._version for t in self.sources]
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
        return all(t._version == v for t, v in zip(self.sources, self.versions))

    def project(self, normed: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """normed (L', R, D) already through each layer's norm -> K, V (L', R, H_kv*hd) for layers lo..hi-1."""
        w = self.w[lo:hi]  # (L', 2K, D)
        out = torch.bmm(normed, w.transpose(1, 2)) if self.b is None else torch.baddbmm(
            self.b[lo:hi, None, :], normed, w.transpose(1, 2))
        return out[..., : self.kv_dim], out[..., self.kv_dim :]


class ExitKernel:
    """How the engine runs one exit: its transformer layer (FREE), if any, and its classifier."""

    def __init__(self, module, kernel, slot: int):
        self.kind = module.kind  # "transformer" | "linear" | "frozen-head"
        self.slot = slot  # index in the exit cache (transformer exits only)
        self.layer = kernel.layer_weights(module.layer) if self.kind == "transformer" else None
        self.classifier = module.classifier.weight if self.kind == "linear" else None
        self.uses_cache = self.kind == "transformer"

    def logits(self, kernel, state: torch.Tensor, subset=None) -> torch.Tensor:
        """(R, V) logits, or (R, K) over the token ids of `subset` (a `HeadSubset`: its rows of the classifier)."""
        if self.classifier is not None:
            w = self.classifier if subset is None else subset.rows(self.classifier)
            return F.linear(kernel.final_norm(state), w)
        return kernel.logits(state) if subset is None else kernel.logits(state, subset.rows(kernel.head_w))
