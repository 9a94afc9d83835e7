"""The decode step with static shapes, captured as CUDA graphs on a GPU.

A small LM at batch 1 is launch-bound: a layer is ~25 kernels of microseconds each, and Python issues them one by
one. `StaticStep` makes the per-token work between two exit decisions one replayable CUDA graph (gpt-fast's and
vLLM's approach): every row and every cache column take part (attention masks the columns past the token's own), the
token's column is a device tensor, and K/V are written with `index_copy_` at that column, so the same graph serves
every step. The step is cut into segments at the exits that decide: layers (e_k, e_k+1] plus the exit at e_k+1
(its transformer, the head, the logits); between segments the host asks the criterion, which is the one host sync
per exit decision. Full depth is one segment, one graph per token.

Rows that leave keep riding through the later segments (static shapes: the batch cannot shrink inside a graph); what
they compute there is overwritten afterwards by the skip policy's fill (`kv.py`), so the caches and tokens are those
of the dynamic engine (tested on CPU, where the same segment functions run eagerly), and the work records still count
what each row needed.

Greedy speculative decoding has its own static rounds (`StaticSpeculative`: L + 1 single-token drafting feeds and one
verification block, each one graph). Not captured (they run on the dynamic path): catch-up, whose token groups change
shape from step to step; gated checks; speculative sampling; RoPE types that rescale with the sequence length.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import torch

from freevlm.generation.cache import Span
from freevlm.generation.events import ExitEvent


def capture(fn, pool) -> torch.cuda.CUDAGraph:
    """`fn` captured as a CUDA graph (in memory pool `pool`), after two warm-up runs on a side stream (allocator,
    cuBLAS workspaces); what the warm-ups write, the graph's replay rewrites."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # No garbage collection during capture: a dead engine's graphs (held in a reference cycle) destroyed mid-capture
    # invalidate it ("operation not permitted when stream is capturing", seen on an H200)
    collecting = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph, pool=pool):
            fn()
    finally:
        if collecting:
            gc.enable()
    return graph


def to_device(values: list, device: torch.device) -> torch.Tensor:
    """Integers the host already knows, as a long tensor on `device` without a host sync: on CUDA a non-blocking copy
    from pinned memory (a copy from pageable memory waits for the stream)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.long, device=device)
    return torch.tensor(values, dtype=torch.long, pin_memory=True).to(device, non_blocking=True)


@dataclass
class _SegmentOut:
    x: torch.Tensor  # (B, 1, D) hidden state after the segment's last layer
    prev: torch.Tensor | None  # (B, D) the last layer's input (the similarity criterion compares the two)
    state: torch.Tensor | None  # (B, D) the exit's output state
    logits: torch.Tensor  # (B, V) the exit's (or the final head's) logits


class StaticStep:
    """One decode step per call, over static buffers; CUDA graphs on CUDA, the same functions eagerly elsewhere."""

    def __init__(self, engine, capture: bool | None = None):
        self.engine = engine
        cache = engine.cache
        device = cache.keys.device
        self.capture = device.type == "cuda" if capture is None else capture
        self.keys = cache.keys  # the cache its graphs read (a session reuses the step only over the same tensors)
        self.tokens = torch.zeros(cache.batch, dtype=torch.long, device=device)
        self.col = torch.zeros(1, dtype=torch.long, device=device)
        self.columns = torch.arange(cache.max_len, device=device)
        deciding = engine.exit_list if engine.checking else []
        bounds = [0, *deciding, engine.n]
        self.segments = list(zip(bounds[:-1], bounds[1:]))
        self.outputs: dict[int, _SegmentOut] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None

    def span(self) -> Span:
        """Every row at column `self.col`, attending over all cache columns up to it (built inside the graph)."""
        e, cache = self.engine, self.engine.cache
        j = self.columns
        allowed = (j <= self.col)[None, :] & (cache.not_pad | (j == self.col)[None, :])  # (B, T)
        cols = self.col.expand(cache.batch, 1)
        span = Span(None, 1, cache.max_len, cols, e._base + self.col, allowed[:, None, None, :], index=self.col)
        return e._prepare(span)

    def _segment(self, i: int) -> _SegmentOut:
        e, k = self.engine, self.engine.kernel
        lo, hi = self.segments[i]
        span = self.span()
        x = k.embed_tokens(self.tokens[:, None], span.positions) if i == 0 else self.outputs[i - 1].x
        prev = x
        for layer in range(lo + 1, hi + 1):
            prev = x
            x = e.run_layer(layer, x, span)
        ex = e.exit_at.get(hi) if hi < e.n else None
        if ex is None:
            return _SegmentOut(x, None, None, k.logits(x[:, -1]))
        state = e.run_exit(ex, x, span) if ex.uses_cache else x
        return _SegmentOut(x, prev[:, -1], state[:, -1], ex.logits(k, state[:, -1], e.head_subset))  # (B, V|K)

    def _run(self, i: int) -> _SegmentOut:
        def run():
            self.outputs[i] = self._segment(i)

        if not self.capture:
            run()
        else:
            if i not in self.graphs:
                self.graphs[i] = capture(run, self.pool)
            self.graphs[i].replay()
        return self.outputs[i]

    def step(self, tokens: torch.Tensor, col: int) -> tuple[torch.Tensor, torch.Tensor, list]:
        """Decode one token per row at column `col`: (logits (B, V), exit layer per row (B,), exit events)."""
        e = self.engine
        self.tokens.copy_(tokens)
        self.col.fill_(col)
        b = tokens.shape[0]
        if not e.checking:
            out = self._run(0)
            return out.logits, e._full_exit_layer(b, tokens.device), []
        logits, exit_layer, crit_state = e._new_outputs(b, e.cache.keys)
        rows = e._rows
        active = torch.ones(b, dtype=torch.bool, device=tokens.device)
        events = []
        for i, (_, hi) in enumerate(self.segments):
            seg = self._run(i)
            if hi == e.n:  # torch.where, not a masked write: no host sync
                logits = torch.where(active[:, None], seg.logits.to(logits.dtype), logits)
                break
            ex = e.exit_at[hi]
            go = e.criterion(crit_state, rows, seg.logits if e.criterion.needs_logits else None, seg.x[:, -1],
                             seg.prev) & active
            leaving, staying = torch.stack([go, active & ~go]).tolist()  # the decision's one host sync
            rows_out = [r for r, g in enumerate(leaving) if g]
            if rows_out:
                chosen = seg.logits if e.head_subset is None else e.head_subset.scatter(seg.logits)
                logits = torch.where(go[:, None], chosen.to(logits.dtype), logits)
                exit_layer = torch.where(go, hi, exit_layer)
                source = seg.state if e.policy.source == "exit" else seg.x[:, -1]
                idx = to_device(rows_out, tokens.device)  # from the host's copy: no second sync (nonzero)
                rope = None
                if e.kernel.has_rope:  # propagation applies RoPE at the token's position
                    cos, sin = e.kernel.rope((e._base + self.col)[idx], e.tables)
                    rope = (cos[:, -1], sin[:, -1])
                events.append(ExitEvent(idx, hi, ex.slot, source[idx].clone(), self.col.expand(idx.shape[0]), rope))
                active = active & ~go
            if not any(staying):
                break
        return logits, exit_layer, events


class StaticSpeculative:
    """Greedy self-speculative rounds over static buffers; CUDA graphs on CUDA, the same functions eagerly elsewhere.

    A round is L + 1 single-token feeds and one verification block, each one replayable graph (gpt-fast's shape of
    speculative decoding): feed i (0..L) runs token i of the block (the current token, then draft i) through layers
    1..e and the exit transformer at e, keeping h_e, and feeds 0..L-1 also score the exit's head, whose argmax is the
    next draft. Then layers e+1..N run once over the L + 1 h_e states at each row's own columns (rows drift apart as
    they keep different numbers of drafts, so K/V are scattered per row), the full model's argmax is compared with the
    drafts, and `kept` / `next` are decided on the device. Every row drafts L every round (static shapes); what a row
    may really draft (its cap, EOS, the confidence threshold) is a mask on the device, so the tokens are exactly the
    dynamic path's. The last feed's exit step writes that token's exit K/V, so no fix-up runs when every draft is
    kept. One host transfer per round brings back what the host emits.
    """

    def __init__(self, engine, layer: int, length: int, threshold: float | None, subset, eos: torch.Tensor,
                 capture: bool | None = None):
        self.engine = engine
        cache = engine.cache
        device = cache.keys.device
        self.capture = device.type == "cuda" if capture is None else capture
        self.keys = cache.keys  # the cache its graphs read (a session reuses the rounds only over the same tensors)
        self.layer, self.length, self.threshold, self.subset, self.eos = layer, length, threshold, subset, eos
        b, d = cache.batch, engine.lm.hidden_size
        self.tok = torch.zeros(b, dtype=torch.long, device=device)  # the round's current token per row
        self.col = torch.zeros(b, dtype=torch.long, device=device)  # its column per row
        self.cap = torch.zeros(b, dtype=torch.long, device=device)  # drafts each row may make this round
        self.hs = torch.zeros(b, length + 1, d, dtype=cache.keys.dtype, device=device)  # (B, L+1, D) h_e per feed
        self.drafts = torch.zeros(b, length, dtype=torch.long, device=device)
        self.stop = torch.zeros(b, length, dtype=torch.bool, device=device)  # a draft after which the row stops
        self.result: torch.Tensor | None = None  # (B, 3 + L): kept, drafted, next token, drafts
        self.columns = torch.arange(cache.max_len, device=device)
        self.offsets = torch.arange(length + 1, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None

    def _span(self, cols: torch.Tensor) -> Span:
        """Every row at its own columns `cols` (B, q), attending over every cache column up to each (static)."""
        e, cache = self.engine, self.engine.cache
        j = self.columns
        own = j[None, None, :] == cols[:, :, None]  # (B, q, T)
        allowed = (j[None, None, :] <= cols[:, :, None]) & (cache.not_pad[:, None, :] | own)
        span = Span(None, cols.shape[1], cache.max_len, cols, e._base + cols, allowed[:, None])
        return e._prepare(span)

    def _feed(self, i: int) -> None:
        e, k = self.engine, self.engine.kernel
        span = self._span((self.col + i)[:, None])
        tok = self.tok if i == 0 else self.drafts[:, i - 1]
        h = k.embed_tokens(tok[:, None], span.positions)
        for layer in range(1, self.layer + 1):
            h = e.run_layer(layer, h, span)
        self.hs[:, i] = h[:, 0]
        ex = e.exit_at[self.layer]
        state = e.run_exit(ex, h, span) if ex.uses_cache else h
        if i == self.length:
            return
        lg = ex.logits(k, state[:, -1], self.subset).float()  # (B, V) or (B, K)
        best = lg.argmax(-1)
        draft = best if self.subset is None else self.subset.token(best)
        self.drafts[:, i] = draft
        stop = torch.isin(draft, self.eos)  # nothing after a drafted EOS could be emitted
        if self.threshold is not None:
            stop = stop | (torch.softmax(lg, -1).amax(-1) < self.threshold)
        self.stop[:, i] = stop

    def _verify(self) -> None:
        e, k = self.engine, self.engine.kernel
        length = self.length
        span = self._span(self.col[:, None] + self.offsets[None])
        x = self.hs
        for layer in range(self.layer + 1, e.n + 1):
            x = e.run_layer(layer, x, span)
        f = k.logits(x).float().argmax(-1)  # (B, L+1) the full model's next token after each block token
        # draft i is made when i < cap and no earlier draft stopped the row
        go_on = torch.cat([torch.ones_like(self.stop[:, :1]), ~self.stop[:, :-1]], 1).long().cumprod(1).bool()
        made = go_on & (self.offsets[None, :length] < self.cap[:, None])
        drafted = made.sum(1)
        kept = torch.minimum((self.drafts == f[:, :length]).long().cumprod(1).sum(1), drafted)
        nxt = f.gather(1, kept[:, None])[:, 0]
        self.result = torch.cat([kept[:, None], drafted[:, None], nxt[:, None], self.drafts], 1)

    def _run(self, key: int, fn) -> None:
        if not self.capture:
            fn()
            return
        if key not in self.graphs:
            self.graphs[key] = capture(fn, self.pool)
        self.graphs[key].replay()

    def round(self, tok: torch.Tensor, col: torch.Tensor, cap: torch.Tensor) -> list[list[int]]:
        """One round for every row from its current token `tok` at column `col`, drafting at most `cap`: per row
        [kept, drafted, next token, draft 1..L] (one host transfer)."""
        self.tok.copy_(tok)
        self.col.copy_(col)
        self.cap.copy_(cap)
        for i in range(self.length + 1):
            self._run(i, lambda i=i: self._feed(i))
        self._run(-1, self._verify)
        return self.result.tolist()
