"""The decode step with static shapes, captured as CUDA graphs on a GPU.

A small LM at batch 1 is launch-bound: a layer is ~25 kernels of microseconds each, and Python issues them one by
one. `StaticStep` makes each segment of a decode step (layers (e_k, e_k+1] plus the exit at e_k+1: its transformer,
the head, the logits; `Engine.run_segment`) one replayable CUDA graph (gpt-fast's and vLLM's approach): every row and
every cache column take part (attention masks the columns past the token's own), the token's column is a device
tensor, and K/V are written with `index_copy_` at that column, so the same graph serves every step. Between two
segments the engine's step loop (`Engine._step`) asks the criterion: one host sync per exit decision. Full depth is
one segment, one graph per token.

Rows that leave keep riding through the later segments (static shapes: the batch cannot shrink inside a graph); what
they compute there is overwritten afterwards by the skip policy's fill (`kv.py`), so the caches and tokens are those
of the eager engine (tested on CPU, where the same segment functions run eagerly), and the work records still count
what each row needed.

Greedy speculative decoding runs in `StaticSpeculative` rounds (L + 1 single-token drafting feeds and one verification
block, each one graph on CUDA; trimmed to what the rows need when eager). Not captured (they run eagerly): catch-up,
whose token groups change shape from step to step; gated checks; speculative sampling; RoPE types that rescale with
the sequence length.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass

import torch

from freevlm.generation.cache import Span
from freevlm.generation.kv import fill_exit_kv


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
    """One decode step's segments over static buffers: CUDA graphs on CUDA, the same functions eagerly elsewhere. The
    step itself (the exit decisions between segments) is the engine's (`Engine._step`)."""

    def __init__(self, engine, capture: bool | None = None):
        self.engine = engine
        cache = engine.cache
        device = cache.keys.device
        self.capture = device.type == "cuda" if capture is None else capture
        self.keys = cache.keys  # the cache its graphs read (a session reuses the step only over the same tensors)
        self.tokens = torch.zeros(cache.batch, dtype=torch.long, device=device)
        self.col = torch.zeros(1, dtype=torch.long, device=device)
        self.columns = torch.arange(cache.max_len, device=device)
        self.segments = engine.segments()
        self.outputs: dict[int, _SegmentOut] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None

    def load(self, tokens: torch.Tensor, col: int) -> None:
        """The step's inputs: one token per row (B,), written at column `col`."""
        self.tokens.copy_(tokens)
        self.col.fill_(col)

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
        x, prev, state = e.run_segment(lo, hi, x, span)
        ex = e.exit_at.get(hi)
        if ex is None:
            return _SegmentOut(x, None, None, k.logits(x[:, -1]))
        return _SegmentOut(x, prev[:, -1], state[:, -1], ex.logits(k, state[:, -1], e.head_subset))  # (B, V|K)

    def run(self, i: int) -> _SegmentOut:
        """Segment i for every row: its layers, its exit and logits (replayed from its graph on CUDA)."""
        def run():
            self.outputs[i] = self._segment(i)

        if not self.capture:
            run()
        else:
            if i not in self.graphs:
                self.graphs[i] = capture(run, self.pool)
            self.graphs[i].replay()
        return self.outputs[i]


class StaticSpeculative:
    """Greedy self-speculative rounds over static buffers; CUDA graphs on CUDA, the same functions eagerly elsewhere.

    A round is L + 1 single-token feeds and one verification block, each one replayable graph (gpt-fast's shape of
    speculative decoding): feed i (0..L) runs token i of the block (the current token, then draft i) through layers
    1..e and the exit transformer at e, keeping h_e, and feeds 0..L-1 also score the exit's head, whose argmax is the
    next draft. Then layers e+1..N run once over the L + 1 h_e states at each row's own columns (rows drift apart as
    they keep different numbers of drafts, so K/V are scattered per row), the full model's argmax is compared with the
    drafts, and `kept` / `next` are decided on the device. Every row drafts L every round (static shapes); what a row
    may really draft (its cap, EOS, the confidence threshold) is a mask on the device, so the tokens are exactly those
    of a round that stops where the rows stop (`trim`, the eager round). Each graphed feed runs the exit, so that
    token's exit K/V are written and no fix-up runs when every draft is kept; the eager round skips the exit on its last
    feed and projects that token's exit K/V where every draft was kept (`_last_exit_kv`). One host transfer per round
    brings back what the host emits.
    """

    trim = True  # eager rounds stop feeding once no row needs the next feed (see `round`)

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
        self.state: torch.Tensor | None = None  # (R, D) the last feed's exit state, for its rows (None: all)
        self.state_rows: torch.Tensor | None = None
        # speculative sampling (eager rounds only): logits -> warped probabilities, set per call; None: greedy
        self.warp: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.q: torch.Tensor | None = None  # (B, L, V) the draft distributions (sampling)
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

    def _feed(self, i: int, span: Span | None = None, rows: torch.Tensor | None = None, exit: bool = True) -> None:
        """Block token i (the current token, then draft i-1) through segment (0, e]: layers 1..e and the exit at e,
        keeping h_e for the verification (`span`: where the token sits, default: over every cache column; `rows`: only
        these rows, default: all; `exit`: False when no row drafts from this feed, see `_last_exit_kv`)."""
        e, k = self.engine, self.engine.kernel
        span = self._span((self.col + i)[:, None]) if span is None else span
        tok = _rows(self.tok if i == 0 else self.drafts[:, i - 1], rows)
        h = k.embed_tokens(tok[:, None], span.positions)
        h, _, state = e.run_segment(0, self.layer, h, span, exit=exit)
        if rows is None:
            self.hs[:, i] = h[:, 0]
        else:
            self.hs[rows, i] = h[:, 0]
        self.state, self.state_rows = state[:, -1], rows

    def _draft(self, i: int) -> None:
        """Draft i from the exit's head (or head subset) on feed i's state: its argmax, or (sampling) a sample of its
        warped distribution q, kept for the acceptance rule; and whether the row stops after it."""
        e, k, rows = self.engine, self.engine.kernel, self.state_rows
        lg = e.exit_at[self.layer].logits(k, self.state, self.subset).float()  # (R, V) or (R, K)
        if self.warp is None:
            best = lg.argmax(-1)
            draft = best if self.subset is None else self.subset.token(best)
            confidence = torch.softmax(lg, -1).amax(-1) if self.threshold is not None else None
        else:  # a subset's q is zero outside it: the acceptance rule still holds
            q = self.warp(lg if self.subset is None else self.subset.scatter(lg))
            if self.q is None:
                self.q = q.new_zeros((self.hs.shape[0], self.length, q.shape[1]))
            _write(self.q[:, i], rows, q)
            draft = torch.multinomial(q, 1)[:, 0]
            confidence = q.amax(-1)
        stop = torch.isin(draft, self.eos)  # nothing after a drafted EOS could be emitted
        if self.threshold is not None:
            stop = stop | (confidence < self.threshold)
        _write(self.drafts[:, i], rows, draft)
        _write(self.stop[:, i], rows, stop)

    def _feed_and_draft(self, i: int) -> None:
        self._feed(i)
        if i < self.length:
            self._draft(i)

    def _made(self, drafts: int) -> torch.Tensor:
        """(B, drafts) whether each row makes draft j: j < its cap and no earlier draft stopped it."""
        earlier = ~self.stop[:, : max(drafts - 1, 0)]
        go_on = torch.cat([torch.ones_like(self.stop[:, :1]), earlier], 1)[:, :drafts].long().cumprod(1).bool()
        return go_on & (self.offsets[None, :drafts] < self.cap[:, None])

    def _verify(self, m: int, span: Span | None = None, rows: torch.Tensor | None = None) -> None:
        """Segment (e, N] once over the m fed block tokens at each row's own columns (`rows`: only these rows); the full
        model's output decides how many drafts each row keeps and its next token."""
        e, k = self.engine, self.engine.kernel
        span = self._span(self.col[:, None] + self.offsets[None, :m]) if span is None else span
        x = e.run_segment(self.layer, e.n, _rows(self.hs, rows)[:, :m], span)[0]
        d = min(m, self.length)  # drafts the block verifies
        drafted = _rows(self._made(d), rows).sum(1)
        drafts = _rows(self.drafts, rows)
        if self.warp is None:
            f = k.logits(x).float().argmax(-1)  # (R, m) the full model's next token after each block token
            kept = torch.minimum((drafts[:, :d] == f[:, :d]).long().cumprod(1).sum(1), drafted)
            nxt = f.gather(1, kept.clamp(max=m - 1)[:, None])[:, 0]  # kept = m: the row kept its EOS and ends there
        else:
            kept, nxt = self._accept(self.warp(k.logits(x).float()), drafts[:, :d], _rows(self.q, rows), drafted)
        result = torch.cat([kept[:, None], drafted[:, None], nxt[:, None], drafts], 1)
        if rows is None:
            self.result = result
        else:  # the rows not verified are finished: the host reads nothing of theirs
            self.result = result.new_zeros((self.hs.shape[0], result.shape[1])).index_copy_(0, rows, result)

    @staticmethod
    def _accept(p: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor | None, drafted: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Speculative sampling's rule over the target distributions p (R, m, V) and the d drafts (R, d) drawn from q
        (R, >= d, V): draft x is kept with probability min(1, p(x) / q(x)), up to the first rejection; the next token is
        sampled from the residual max(0, p - q) there (or from p after the last kept draft), so the output has plain
        sampling's distribution."""
        b, m = p.shape[:2]
        d = drafts.shape[1]
        ar = torch.arange(b, device=p.device)
        if not d:
            return drafted.new_zeros(b), torch.multinomial(p[:, 0], 1)[:, 0]
        q = q[:, :d]
        p_d, q_d = p[:, :d].gather(-1, drafts[..., None])[..., 0], q.gather(-1, drafts[..., None])[..., 0]
        ok = torch.rand_like(p_d) < (p_d / q_d).clamp(max=1.0)  # unmade drafts: past `drafted`, never counted
        kept = torch.minimum(ok.long().cumprod(1).sum(1), drafted)
        at = p[ar, kept.clamp(max=m - 1)]  # the target distribution at the first rejection
        qd = torch.cat([q, torch.zeros_like(q[:, :1])], 1)[ar, kept]
        resid = torch.where((kept < drafted)[:, None], (at - qd).clamp(min=0), at)
        resid = torch.where(resid.sum(-1, keepdim=True) > 0, resid, at)  # p == q: nothing to correct
        return kept, torch.multinomial(resid / resid.sum(-1, keepdim=True), 1)[:, 0]

    def _run(self, key: int, fn) -> None:
        if not self.capture:
            fn()
            return
        if key not in self.graphs:
            self.graphs[key] = capture(fn, self.pool)
        self.graphs[key].replay()

    def round(self, tok: torch.Tensor, col: torch.Tensor, cap: torch.Tensor, cols: list[int], caps: list[int],
              live: list[int]) -> list[list[int]]:
        """One round from each row's current token `tok` at column `col`, drafting at most `cap` (`cols`, `caps`: the
        host's copies; `live`: the rows not finished): per row [kept, drafted, next token, draft 1..L] (one host
        transfer). Graphed, a round runs every row through L + 1 feeds (fixed shapes). Eager with `trim`, each feed
        runs only the rows that need it, feeding stops once none does, and the live rows verify only what was fed,
        over the columns in use (slices when the rows are at one column): the same tokens, with a host check per feed,
        which costs nothing where nothing is asynchronous (a CPU)."""
        self.tok.copy_(tok)
        self.col.copy_(col)
        self.cap.copy_(cap)
        length = self.length
        if self.capture or not self.trim:
            for i in range(length + 1):
                self._run(i, lambda i=i: self._feed_and_draft(i))
            self._run(-1, lambda: self._verify(length + 1))
            return self.result.tolist()
        stopped = [False] * len(cols)  # a draft so far stopped the row (an EOS, or low confidence)
        fed_on = list(live)  # rows whose last draft was made and is not an EOS: they feed it
        m, last = length + 1, None
        for i in range(length + 1):
            if not fed_on:
                m = i
                break
            drafting = [r for r in fed_on if i < length and i < caps[r] and not stopped[r]]
            span, index = self._eager_span(fed_on, cols, i, 1)
            self._feed(i, span, index, exit=bool(drafting))  # no row drafts from the last feed: its exit waits
            if not drafting:
                m, last = i + 1, (span, fed_on)
                break
            self._draft(i)
            stop, eos = torch.stack([self.stop[:, i], torch.isin(self.drafts[:, i], self.eos)]).tolist()
            for r in drafting:
                stopped[r] = stop[r]
            fed_on = [r for r in drafting if not eos[r]]
        self._verify(m, *self._eager_span(live, cols, 0, m))
        result = self.result.tolist()
        if last is not None:
            self._last_exit_kv(m - 1, *last, result)
        return result

    def _last_exit_kv(self, i: int, span: Span, fed: list[int], result: list[list[int]]) -> None:
        """The exit K/V of feed i, which ran without its exit (no row drafted from it), for the rows that kept every
        draft: that token is emitted and later feeds attend to it at the exit (a row that rejected a draft rewrites the
        column). Projected from h_e (the exit layer's K/V depend only on its input): an exit transformer's run saved per
        round."""
        ex = self.engine.exit_at[self.layer]
        at = [j for j, r in enumerate(fed) if result[r][0] == result[r][1]]
        if not ex.uses_cache or not at:
            return
        device = self.col.device
        rows = to_device([fed[j] for j in at], device)
        rope = None
        if span.rope is not None:
            pick = to_device(at, device)
            rope = tuple((t if t.shape[0] == 1 else t[pick])[:, -1].expand(len(at), -1) for t in span.rope)
        fill_exit_kv(self.engine, ex, self.hs[rows, i], rows, self.col[rows] + i, rope)

    def _eager_span(self, rows: list[int], cols: list[int], offset: int, q: int
                    ) -> tuple[Span, torch.Tensor | None]:
        """The span of q tokens per row of `rows` from `offset` columns after each one's current token, over the columns
        in use; and those rows as an index (None: every row)."""
        e = self.engine
        index = None if len(rows) == len(cols) else to_device(rows, self.col.device)
        at = {cols[r] for r in rows}
        if len(at) == 1:
            return e.aligned_span(index, at.pop() + offset, q), index
        return e.span(index, _rows(self.col, index)[:, None] + offset + self.offsets[None, :q]), index


def _rows(t: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None:
    return t if rows is None or t is None else t[rows]


def _write(buf: torch.Tensor, rows: torch.Tensor | None, value: torch.Tensor) -> None:
    if rows is None:
        buf.copy_(value)
    else:
        buf[rows] = value
