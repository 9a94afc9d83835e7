"""A measured cost model of decoding: what each kind of work takes on this machine, for this model.

The paper's speedup charges an exit only for the layers below it; the compute speedup charges parameters; neither
sees what a layer call, an exit check or a gate costs in seconds here. `measure_costs` times (interleaved, medians
of repeats) one backbone layer step, one exit-transformer step, an exit check's head + criterion, a gate, one
skipped layer's K/V propagation and copy, the fixed cost of a decode step (embedding, masks, the loop), a
verification block of q tokens (speculative decoding), and the fixed cost of a call (images, vision side, prefill).
`predict_seconds` turns a run's work records into seconds with it, so any configuration's tokens/s can be predicted
from its counts (and checked against its measured tokens/s).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from freevlm.backbones.base import LMInputs
from freevlm.generation.cache import make_span
from freevlm.generation.criteria import Confidence
from freevlm.generation.engine import Engine, StepRecord
from freevlm.generation.kernels.common import ExitKernel
from freevlm.generation.kv import _stack, _write
from freevlm.machine import system_info
from freevlm.planning.gates import ExitGates, gate_hidden_size


@dataclass
class MeasuredCosts:
    """Seconds per unit of work, at one batch size and cache length."""

    batch_size: int
    cache_length: int
    layer: float  # one backbone layer, one token per row
    exit_layer: float  # one exit transformer (0 if the exits have none)
    head: float  # an exit check's decision: final norm + vocabulary projection + the criterion (+ its host sync)
    gate: float  # one gate: the MLP on h_i, its sigmoid and the host sync
    kv_projection: float  # one skipped layer's K/V by propagation (per layer, amortised over a token's skipped run)
    kv_copy: float  # one skipped layer's K/V by copy
    step: float  # the fixed part of a decode step (embedding, span, Python loop)
    call: float  # the fixed part of a generate call: images, processor, vision side, prefill, result
    block: dict[int, float] = field(default_factory=dict)  # q tokens per row through one layer (speculative)
    machine: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        d["block"] = {str(k): v for k, v in self.block.items()}
        return d

    @classmethod
    def from_json(cls, d: dict) -> MeasuredCosts:
        d = dict(d)
        d["block"] = {int(k): v for k, v in d.get("block", {}).items()}
        return cls(**d)

    def block_layer(self, q: int) -> float:
        """One layer over q tokens per row, interpolated between measured block sizes."""
        if q <= 1 or not self.block:
            return self.layer
        sizes = sorted(self.block)
        lo = max([s for s in sizes if s <= q], default=1)
        hi = min([s for s in sizes if s >= q], default=sizes[-1])
        t_lo = self.layer if lo == 1 else self.block[lo]
        if hi == lo:
            return t_lo + (q - lo) * (t_lo - self.layer) / max(lo - 1, 1) if q > lo else t_lo
        return t_lo + (self.block[hi] - t_lo) * (q - lo) / (hi - lo)


def _synchronizer(device: torch.device | str | None) -> Callable[[], None]:
    """What waits for the device's queued work: CUDA kernels run asynchronously, so a timer read without it measures
    the launches, not the work (and charges the queue to whatever is timed next). Nothing on a CPU."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _timed(fns: dict[str, Callable[[], object]], repeats: int, number: int,
           device: torch.device | str | None = None) -> dict[str, float]:
    """Median seconds per call of each function; functions alternate so machine drift hits all alike. On a CUDA
    `device` each timed region starts and ends with the device synchronised."""
    sync = _synchronizer(device)
    for fn in fns.values():  # warm-up
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            for _ in range(number):
                fn()
            sync()
            times[name].append((time.perf_counter() - start) / number)
    return {k: statistics.median(v) for k, v in times.items()}


@torch.no_grad()
def measure_costs(vlm, call: Callable[[], object] | None = None, batch_size: int = 1, cache_length: int = 48,
                  repeats: int = 7, number: int = 10, blocks: tuple[int, ...] = (2, 4, 9)) -> MeasuredCosts:
    """Time each kind of work on `vlm` (a backbone with exits). `call`: one representative generate call of
    `batch_size` images with `max_new_tokens=1` (its time is the per-call fixed cost); without it the call cost
    is left at 0."""
    bb, exits = vlm.backbone, vlm.exits
    lm = bb.lm
    device = next(bb.model.parameters()).device
    dtype = next(bb.model.parameters()).dtype
    d = lm.hidden_size
    b = batch_size
    p = cache_length - 1
    g = torch.Generator().manual_seed(0)
    if lm.is_encoder_decoder:
        embeds = torch.randn(b, p, d, generator=g).to(device, dtype)
        p = 1
    else:
        embeds = torch.randn(b, p, d, generator=g).to(device, dtype) * 0.02
    lm_inputs = LMInputs(embeds, torch.ones(b, embeds.shape[1], dtype=torch.long, device=device), None)
    engine = Engine(lm, exits, Confidence(0.999999) if exits is not None else None, static=False)
    engine.prefill(lm_inputs, max_new_tokens=max(blocks) + 2)
    cache, k = engine.cache, engine.kernel
    col = cache.length
    span = engine.aligned_span(None, col, 1)
    x = k.embed_tokens(torch.full((b, 1), 5, device=device), span.positions)
    tokens = torch.full((b,), 5, dtype=torch.long, device=device)
    layer_params = sum(q.numel() for q in lm.layers[0].parameters())
    gates = ExitGates([1], d, gate_hidden_size(d, layer_params)).to(device, dtype)
    crit = Confidence(0.999999)
    rows = torch.arange(b, device=device)
    n = lm.num_layers
    stack = _stack(lm, ("layers",), k, k.layers)
    state = x[:, -1]

    def check(ex):
        logits = ex.logits(k, x[:, -1])
        return bool(crit({}, rows, logits, None, None).any())

    def gate():
        return bool((torch.sigmoid(gates(1, x[:, -1])) > 0.5).any())

    def propagate():
        kk, vv = k.project_kv(stack, 1, n, state, None if span.rope is None else (span.rope[0][:, -1],
                                                                                  span.rope[1][:, -1]))
        _write(cache.keys[1:n], cache.values[1:n], rows, span.cols[:, -1], kk, vv)

    def copy():
        kk, vv = cache.keys[0][rows, :, span.cols[:, -1]], cache.values[0][rows, :, span.cols[:, -1]]
        _write(cache.keys[1:n], cache.values[1:n], rows, span.cols[:, -1], kk[None].expand(n - 1, *kk.shape),
               vv[None].expand(n - 1, *vv.shape))

    full_engine = Engine(lm, None, static=False)
    full_engine.prefill(lm_inputs, max_new_tokens=2)
    col0 = full_engine.cache.length

    def full_step():  # always the same column (a real step would move on; the work is the same)
        full_engine.cache.length = col0
        return full_engine.step(tokens)

    # Layers are timed as a run through all of them, as decoding meets them: one layer timed alone keeps its
    # weights in cache, and on a CPU the weights' trip from memory is much of a layer's cost.
    def all_layers(inputs, sp):
        for layer in range(1, n + 1):
            engine.run_layer(layer, inputs, sp)

    fns = {"layers": lambda: all_layers(x, span), "head": lambda: k.logits(x[:, -1]), "gate": gate,
           "kv_projection": propagate, "kv_copy": copy, "full_step": full_step}
    exit_kernels = []
    if exits is not None:
        exit_kernels = [ExitKernel(module, k, i) for i, module in enumerate(exits.exits)]
        fns["check"] = lambda: check(exit_kernels[0])
        if exit_kernels[0].uses_cache and engine.uses_exit_cache:
            fns["exit_layers"] = lambda: [engine.run_exit(ex, x, span) for ex in exit_kernels]
    for q in blocks:
        block_span = engine._prepare(make_span(cache, q, engine._base + col + torch.arange(q, device=device)[None],
                                               start=col))
        xq = x.expand(b, q, d).contiguous()
        fns[f"block{q}"] = lambda xq=xq, sp=block_span: all_layers(xq, sp)
    times = _timed(fns, repeats, number, device)
    times["layer"] = times.pop("layers") / n
    if "exit_layers" in times:
        times["exit_layer"] = times.pop("exit_layers") / len(exit_kernels)
    for q in blocks:
        times[f"block{q}"] /= n
    call_seconds = 0.0
    if call is not None:
        call_seconds = _timed({"call": call}, max(3, repeats // 2), max(1, number // 10), device)["call"]
    head_check = times.get("check", times["head"])
    step = max(0.0, times["full_step"] - n * times["layer"] - times["head"])
    return MeasuredCosts(
        batch_size=b, cache_length=cache_length, layer=times["layer"], exit_layer=times.get("exit_layer", 0.0),
        head=head_check, gate=times["gate"], kv_projection=times["kv_projection"] / (n - 1),
        kv_copy=times["kv_copy"] / (n - 1), step=step, call=call_seconds,
        block={q: times[f"block{q}"] for q in blocks}, machine=system_info(),
    )


def step_seconds(rec: StepRecord, costs: MeasuredCosts, rows: torch.Tensor, num_layers: int) -> float:
    """Predicted seconds of one decode step from its work record (batch rows `rows` live). At batch 1 the counts
    are the step's; for a batch the step lasts as long as its busiest row (rows run together, in one call).
    Speculative rounds are predicted by `round_seconds`."""
    if rec.prefill or rows.numel() == 0:
        return 0.0
    rows = rows.to(rec.layers.device)
    if rec.blocks is not None:  # every row ran the same layers (catch-up): price each call by its block size
        layer_seconds = sum(calls * costs.block_layer(q) for q, calls in rec.blocks.items())
        # the exit transformer is a layer of the same shape: scaled by the backbone layer's block ratio
        ratio = (lambda q: costs.block_layer(q) / costs.layer) if costs.layer else (lambda q: float(q))
        exit_seconds = sum(calls * costs.exit_layer * ratio(q) for q, calls in (rec.exit_blocks or {}).items())
    else:
        layer_seconds = float(rec.layers[rows].max()) * costs.layer
        exit_seconds = float(rec.exit_layers[rows].max()) * costs.exit_layer
    return (costs.step + layer_seconds + exit_seconds
            + float(rec.heads[rows].max()) * costs.head + float(rec.gates[rows].max()) * costs.gate
            + float(rec.kv_projections[rows].max()) * costs.kv_projection
            + float(rec.kv_copies[rows].max()) * costs.kv_copy)


def round_seconds(drafted: int, draft_layer: int, num_layers: int, costs: MeasuredCosts, exit_runs: int,
                  head_share: float = 1.0) -> float:
    """Predicted seconds of one speculative round at batch 1: drafted+1 single-token passes through layers 1..e,
    `exit_runs` exit transformers and `drafted` heads (each `head_share` of a full head: a subset head), then one
    block of drafted+1 tokens through layers e+1..N and its heads."""
    m = drafted + 1
    return (m * (costs.step + draft_layer * costs.layer) + exit_runs * costs.exit_layer
            + drafted * costs.head * head_share
            + (num_layers - draft_layer) * costs.block_layer(m) + costs.head)


def predict_seconds(result, costs: MeasuredCosts, draft_layer: int | None = None) -> float:
    """Predicted seconds of a whole `GenerationResult` (its decode steps + one call's fixed cost)."""
    n = result.num_layers
    total = costs.call
    if result.speculative is not None:
        for entry in result.log[1:]:
            live = entry.live
            drafted = int(entry.drafts[live].max()) if live.numel() else 0
            exit_runs = int(entry.exits[live].max()) if live.numel() else 0
            total += round_seconds(drafted, draft_layer or 1, n, costs, exit_runs, entry.head_share)
        return total
    for rec, live in zip(result.records, result.live_rows):
        total += step_seconds(rec, costs, live, n)
    return total
