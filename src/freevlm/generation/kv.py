"""What the layers a token skipped get in their KV cache.

When a token exits at layer i, layers i+1..N (and the exits after i) never ran for it, yet later tokens that go
deeper attend to its keys and values there. Leaving those entries empty silently corrupts every later token, so
one of three policies always fills them:

- `propagate` (CALM's state propagation): the exited state is fed through each skipped layer's K/V projections
  (with the layer's own input norm, and RoPE where the LM has rotary embeddings). The state is the backbone's h_i by
  default (`source="hidden"`, as in CALM); `source="exit"` uses the exit transformer's output instead, which FREE
  trains to resemble the final layer's. Cost per skipped layer: one norm + two projections (about a sixth of an OPT
  layer); all skipped layers of a token are one batched matmul over their stacked projection weights.
- `copy` (MuE-style, and the cheapest): each skipped layer reuses the K/V the exit layer i itself stored for the token
  (no computation; one strided copy). Note this is not CALM's propagation, which recomputes K/V per layer.
- `catch_up`: nothing is approximated. The skipped layers run for the exited token later, batched with the next token
  that goes deep (or at a final flush), so the cache ends up exactly as a full-depth forward would leave it.

Skipped exit transformers (exits deeper than the one that fired) are filled the same way: propagation through their
own K/V projections, or a copy of the fired exit's own K/V.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from freevlm.errors import FreeVLMError
from freevlm.generation.kernels.common import KVStack

POLICIES = ("propagate", "copy", "catch_up")


@dataclass
class SkipPolicy:
    name: str = "propagate"  # one of POLICIES
    source: str = "hidden"  # propagate only: "hidden" (backbone h_i, CALM) or "exit" (the exit's output state)

    def __post_init__(self):
        if self.name not in POLICIES:
            raise FreeVLMError(f"unknown KV policy {self.name!r}; expected one of {', '.join(POLICIES)}")
        if self.source not in ("hidden", "exit"):
            raise FreeVLMError(f"propagation source must be 'hidden' or 'exit', got {self.source!r}")

    @property
    def batch_moves_together(self) -> bool:
        return self.name == "catch_up"


# Stacked projection weights per owner of the layers (the LM adapter, an ExitStack) and per layer set: built once,
# rebuilt when a weight changes (in place, or by `.to(dtype / device)`: `KVStack.fresh`). A stack is never written
# to once built, so engines share them; each engine checks freshness once per call (`engine.kv_stacks`), not per
# event.
_STACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _stack(owner, key: tuple, kernel, weights) -> KVStack:
    per_owner = _STACKS.setdefault(owner, {})
    stack = per_owner.get(key)
    if stack is None or not stack.fresh():
        stack = per_owner[key] = kernel.kv_stack(weights)
    return stack


def _layers_stack(engine) -> KVStack:
    stack = engine.kv_stacks.get("layers")
    if stack is None:
        kernel = engine.kernel
        stack = engine.kv_stacks["layers"] = _stack(engine.lm, ("layers",), kernel, kernel.layers)
    return stack


def _exit_stack(engine) -> KVStack:
    stack = engine.kv_stacks.get("exits")
    if stack is None:
        exits = [engine.exit_at[layer].layer for layer in engine.exit_list]
        stack = engine.kv_stacks["exits"] = _stack(engine.exits_owner, tuple(engine.exit_list), engine.kernel, exits)
    return stack


def fill_exit_kv(engine, ex, state: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, rope=None) -> None:
    """The K/V that exit `ex`'s transformer would write for inputs `state` (R, D), without running the layer (a gate
    kept the exit closed): exact, since a layer's K/V depend on its input alone."""
    cache = engine.cache
    k, v = engine.kernel.project_kv(_exit_stack(engine), ex.slot, ex.slot + 1, state, rope)
    _write(cache.exit_keys[ex.slot : ex.slot + 1], cache.exit_values[ex.slot : ex.slot + 1], rows, cols, k, v)


def _write(keys, values, rows, cols, k, v) -> None:
    """keys/values (L', B, H, T, hd) <- k/v (L', R, H, hd) at (rows, cols)."""
    keys[:, rows, :, cols] = k.transpose(0, 1)  # advanced indices on dims 1 and 3 come first: (R, L', H, hd)
    values[:, rows, :, cols] = v.transpose(0, 1)


def fill_skipped(engine, event) -> None:
    """Fill every slot `event`'s rows skipped this step: backbone layers after its exit layer, deeper exits."""
    cache, kernel, n = engine.cache, engine.kernel, engine.n
    e, idx = event.layer, event.index
    n_exits = len(engine.exit_list) if engine.uses_exit_cache else 0
    rows, cols = event.rows, event.cols
    if engine.policy.name == "propagate":
        if e < n:
            k, v = kernel.project_kv(_layers_stack(engine), e, n, event.state, event.rope)
            _write(cache.keys[e:n], cache.values[e:n], rows, cols, k, v)
        if idx + 1 < n_exits:
            k, v = kernel.project_kv(_exit_stack(engine), idx + 1, n_exits, event.state, event.rope)
            _write(cache.exit_keys[idx + 1 :], cache.exit_values[idx + 1 :], rows, cols, k, v)
        return
    if e < n:  # copy: the exit layer's own K/V
        k, v = cache.keys[e - 1][rows, :, cols], cache.values[e - 1][rows, :, cols]  # (R, H, hd)
        _write(cache.keys[e:n], cache.values[e:n], rows, cols, k[None].expand(n - e, *k.shape),
               v[None].expand(n - e, *v.shape))
    if idx + 1 < n_exits:  # deeper exits: the fired exit transformer's own K/V
        k, v = cache.exit_keys[idx][rows, :, cols], cache.exit_values[idx][rows, :, cols]
        m = n_exits - idx - 1
        _write(cache.exit_keys[idx + 1 :], cache.exit_values[idx + 1 :], rows, cols, k[None].expand(m, *k.shape),
               v[None].expand(m, *v.shape))
