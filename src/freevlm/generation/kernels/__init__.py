"""One functional decoder-layer kernel per LM family (OPT, Llama family, T5), each parity-tested against
transformers. A family without a kernel fails with one line naming it: there is no silent fallback to a slow path.

Every kernel offers the same small set of functions (vLLM-style), the `DecoderKernel` protocol (`common.py`):
`layer_weights(module)`, `embed` / `embed_tokens`, `start(max_len, device)` (the call's tables: RoPE, T5 bias) and
`prepare(span, tables)` / `rope(positions, tables)`, `layer(weights, x, cache_k, cache_v, span, cross)`, `kv_stack` /
`project_kv` (propagation into skipped layers), `final_norm`, `logits`; T5's adds `encoder_bias` and `cross_kv`. The
engine asks a kernel what it needs (`has_rope`, `static_rope`, `dtype`), never which family it is.
"""

from __future__ import annotations

from freevlm.errors import FreeVLMError
from freevlm.generation.kernels.common import DecoderKernel
from freevlm.generation.kernels.llama import LlamaKernel
from freevlm.generation.kernels.opt import OPTKernel
from freevlm.generation.kernels.t5 import T5Kernel

KERNELS = {"opt": OPTKernel, "llama": LlamaKernel, "mistral": LlamaKernel, "t5": T5Kernel,
           # Qwen2 LMs: a Llama layer with QKV biases; Qwen2-VL's multimodal RoPE comes from its rotary module
           "qwen2": LlamaKernel, "qwen2_vl_text": LlamaKernel, "qwen2_5_vl_text": LlamaKernel}


def kernel_for(lm) -> DecoderKernel:
    """The kernel for a `LanguageModel` adapter (see `backbones/lm.py`), built once per adapter and shared by every
    engine on it: it holds the modules' parameters themselves (so later weight updates, `.to()` included, are seen)
    and no per-call state (`start` hands each call its own tables)."""
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
    # what a supported family's config may ask for that the kernels do not implement (Mistral's sliding window,
    # Gemma-style soft-capping), refused whichever family's config it is
    if getattr(lm.config, "sliding_window", None):
        raise FreeVLMError(f"freevlm's decode engine does not implement sliding-window attention ({model_type}, "
                           f"sliding_window={lm.config.sliding_window}); set it to null in the LM config to decode "
                           "with full attention")
    if getattr(lm.config, "attn_logit_softcapping", None):
        raise FreeVLMError(f"freevlm's decode engine does not implement attention soft-capping ({model_type})")
    return cls(lm)
