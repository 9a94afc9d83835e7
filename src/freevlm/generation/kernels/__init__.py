"""One functional decoder-layer kernel per LM family (OPT, Llama family, T5), each parity-tested against
transformers. A family without a kernel fails with one line naming it: there is no silent fallback to a slow path.

Every kernel offers the same small set of functions (vLLM-style): `layer_weights(module)`, `embed` /
`embed_tokens`, `prepare(span)` (RoPE tables, T5 bias), `layer(weights, x, cache_k, cache_v, span, cross)`,
`kv_stack` / `project_kv` (propagation into skipped layers), `final_norm`, `logits`.
"""

from __future__ import annotations

from freevlm.errors import FreeVLMError
from freevlm.generation.kernels.llama import LlamaKernel
from freevlm.generation.kernels.opt import OPTKernel
from freevlm.generation.kernels.t5 import T5Kernel

KERNELS = {"opt": OPTKernel, "llama": LlamaKernel, "mistral": LlamaKernel, "t5": T5Kernel}


def kernel_for(lm):
    """The kernel for a `LanguageModel` adapter (see `backbones/lm.py`), built once per adapter: it holds the
    modules' parameters themselves, so later weight updates are seen, and keeps its RoPE tables between calls."""
    kernel = lm.__dict__.get("_decode_kernel")
    if kernel is None:
        kernel = lm.__dict__["_decode_kernel"] = _build(lm)
    return kernel


def _build(lm):
    model_type = lm.config.model_type
    cls = KERNELS.get(model_type)
    if cls is None:
        raise FreeVLMError(f"freevlm's decode engine has no kernel for LM family {model_type!r} "
                           f"(supported: {', '.join(sorted(KERNELS))})")
    if model_type == "mistral" and getattr(lm.config, "sliding_window", None):
        raise FreeVLMError(f"freevlm's decode engine does not implement Mistral's sliding-window attention "
                           f"(sliding_window={lm.config.sliding_window}); set it to null in the LM config to decode "
                           "with full attention")
    if model_type in ("llama", "mistral") and getattr(lm.config, "attn_logit_softcapping", None):
        raise FreeVLMError(f"freevlm's decode engine does not implement attention soft-capping ({model_type})")
    return cls(lm)
