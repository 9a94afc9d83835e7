"""How much faster: the paper's parameter speedup, a compute speedup that pays for exit checks, and wall-clock.

All three are measured over the LM only, against the same backbone's full-depth decoding.

- Parameter speedup (§4): total / average parameters used per generated token, counting only LM layers: a token
  leaving at exit layer i used i + k layers (k = 1, the exit transformer; the paper's formula), one reaching the
  final layer used N. Exit checks that did not fire, the LM head, and the work of filling skipped layers' caches are
  free in this count, which is why it overstates real gains.
- Compute speedup: parameter-weighted work actually done per decode step, from the engine's records: every
  backbone layer run (catch-up work included), every exit transformer run, every LM-head application (each exit check
  computes a full-vocabulary distribution), and every propagated K/V pair (the skipped layer's norm + K and V
  projections). The reference is N layers + one head per token. The prompt's prefill is the same in both and is
  left out; so is the first token, which the prefill produces.
- Wall-clock: tokens per second of early-exit decoding vs full-depth decoding through the same engine vs the VLM's
  own transformers `generate`, measured side by side (`measure_throughput`).

Parameter counts come from the modules themselves (`numel`), never from a paper's table.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from freevlm.generation.engine import StepRecord


def count_parameters(module: nn.Module | list) -> int:
    modules = module if isinstance(module, (list, tuple)) else [module]
    return sum(p.numel() for m in modules if m is not None for p in m.parameters())


def kv_projection_parameters(layer: nn.Module) -> int:
    """Parameters of what propagation runs for one skipped layer: the input norm and the K and V projections."""
    if hasattr(layer, "input_layernorm"):  # Llama family
        parts = [layer.input_layernorm, layer.self_attn.k_proj, layer.self_attn.v_proj]
    elif hasattr(layer, "self_attn_layer_norm"):  # OPT
        parts = [layer.self_attn_layer_norm, layer.self_attn.k_proj, layer.self_attn.v_proj]
    else:  # T5 block
        attn = layer.layer[0]
        parts = [attn.layer_norm, attn.SelfAttention.k, attn.SelfAttention.v]
    return count_parameters(parts)


@dataclass
class CostModel:
    """Parameters touched per token by each kind of work (a proxy for FLOPs: 2 FLOPs per parameter per token)."""

    num_layers: int
    layer: float  # one backbone decoder layer (mean over layers)
    exit_layer: float  # one exit transformer (0 when exits have none)
    head: float  # one LM-head application: final norm + vocabulary projection (an exit check or the final head)
    kv_projection: float  # one skipped layer's K/V by propagation

    @classmethod
    def from_modules(cls, lm, exits=None) -> CostModel:
        layers = list(lm.layers)
        layer = sum(count_parameters(x) for x in layers) / len(layers)
        exit_layer = 0.0
        if exits is not None and getattr(exits.exits[0], "uses_cache", False):
            exit_layer = count_parameters(exits.exits[0].layer)
        norm = getattr(lm, "norm", None) or getattr(getattr(lm, "decoder", None), "final_layer_norm", None)
        head = count_parameters([lm.lm_head, norm])
        kv = sum(kv_projection_parameters(x) for x in layers) / len(layers)
        return cls(len(layers), layer, exit_layer, head, kv)

    def full_depth_token(self) -> float:
        return self.num_layers * self.layer + self.head

    def work(self, rec: StepRecord) -> torch.Tensor:
        """(B,) parameters touched per row in one step."""
        return (rec.layers * self.layer + rec.exit_layers * self.exit_layer + rec.heads * self.head
                + rec.kv_projections * self.kv_projection)


def parameter_speedup(exit_layers: list[int], num_layers: int, exit_cost_layers: int = 1) -> float:
    """§4: N / mean over tokens of (i + k) for tokens leaving at exit layer i < N, N for final-layer tokens."""
    if not exit_layers:
        return 1.0
    used = [num_layers if i >= num_layers else i + exit_cost_layers for i in exit_layers]
    return num_layers / (sum(used) / len(used))


def work_totals(records: list[StepRecord], live_rows: list[torch.Tensor], cost: CostModel) -> tuple[float, float]:
    """(reference work, actual work) over the decode steps (prefill excluded) of rows still in use. The reference
    is full depth for every token those steps produced (speculative rounds produce several per row)."""
    full = actual = 0.0
    for rec, live in zip(records, live_rows):
        if rec.prefill or live.numel() == 0:
            continue
        live = live.to(rec.layers.device)
        actual += float(cost.work(rec)[live].sum())
        tokens = live.numel() if rec.tokens is None else float(rec.tokens[live].sum())
        full += cost.full_depth_token() * tokens
    return full, actual


def compute_speedup(records: list[StepRecord], live_rows: list[torch.Tensor], cost: CostModel) -> float:
    """Reference work / actual work over the decode steps (prefill excluded) of rows still in use."""
    full, actual = work_totals(records, live_rows, cost)
    return full / actual if actual else 1.0


def exit_fractions(exit_layers: list[int], layers: list[int], num_layers: int) -> dict[int, float]:
    """Fraction of tokens leaving at each exit layer, and at the final layer (key N) — Table 11's quantity."""
    counts = Counter(exit_layers)
    total = max(1, len(exit_layers))
    return {layer: counts.get(layer, 0) / total for layer in [*layers, num_layers]}


def measure_throughput(runs: dict[str, list[Callable[[], int]]], repeats: int = 3, warmup: int = 1) -> dict[str, dict]:
    """Time several decoding paths side by side. `runs[name]` is a list of work items (e.g. one per image), each a
    callable that decodes and returns the number of tokens it generated. Paths are interleaved item by item, so
    that drifts of the machine's speed hit every path alike; each repeat's total time per path is recorded and the
    median over `repeats` (after `warmup` untimed passes) gives tokens/s."""
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            for fn in runs[name]:
                fn()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    tokens: dict[str, int] = {}
    for _ in range(repeats):
        spent = dict.fromkeys(names, 0.0)
        counted = dict.fromkeys(names, 0)
        for i in range(max(len(v) for v in runs.values())):
            for name in names:
                if i < len(runs[name]):
                    start = time.perf_counter()
                    counted[name] += runs[name][i]()
                    spent[name] += time.perf_counter() - start
        for name in names:
            seconds[name].append(spent[name])
            tokens[name] = counted[name]
    out = {}
    for name, secs in seconds.items():
        med = statistics.median(secs)
        out[name] = {"tokens": tokens[name], "median_seconds": med, "tokens_per_second": tokens[name] / med,
                     "seconds": secs}
    return out


def trainable_parameters_per_exit(exits) -> int:
    """Parameters one exit trains (transformer: a layer; linear: a vocabulary classifier; frozen head: 0)."""
    if exits is None or not len(exits.exits):
        return 0
    return sum(p.numel() for p in exits.exits[0].parameters())
