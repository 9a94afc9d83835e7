"""Lossless self-speculative decoding with a FREE exit as the drafter.

A round, for every unfinished row:
1. draft: the current token and then each draft go through layers 1..e, the exit at e and the frozen head, which
   proposes the next token; up to `max_draft` drafts per row (with `adapt_length`, fewer for a row whose drafts
   were rejected early in past rounds), never more than the row can still emit, and a row stops drafting once the
   exit's confidence falls below `threshold` (adaptive) or it drafts an EOS (nothing after it could be emitted; the
   EOS itself is not fed on). Rows that stopped leave the drafting batch; their later block positions are zeros,
   which no token they keep attends to. Layers 1..e write their K/V as they go, and the exit transformer its own.
2. verify: layers e+1..N run once over the whole block (the current token + the drafts), starting from the h_e states
   the drafting already computed, so layers 1..e never run twice. Greedy: the drafts that equal the full model's
   argmax are kept, then the full model's own next token; sampling: the standard speculative-sampling rule (accept
   draft x with probability min(1, p(x)/q(x)), else sample the residual max(0, p - q)), so the output distribution
   is exactly plain sampling's. Acceptance statistics count only drafts a row could emit.
3. roll back: each row's cache length becomes its old length + kept tokens; the rejected drafts' K/V (backbone and
   exit caches) stay where they are and are overwritten by the next round, since attention never reads past a row's
   own column. When every draft was kept, the last block token never ran the exit transformer, so its exit K/V are
   projected from its h_e (what the exit layer would have written: its K/V depend on its input only).

Rows advance by different amounts; they keep their own columns (per-row cache lengths), so no padding is written.
The output equals full-depth decoding's up to floating-point ties: verifying a block computes the same sums as
one-token steps but in other shapes, which can reorder float additions (differences ~1e-7).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from freevlm.errors import FreeVLMError
from freevlm.generation.engine import Engine, StepRecord, _StepLog
from freevlm.generation.graphs import to_device


@dataclass
class DraftSettings:
    layer: int  # the exit that drafts (1-based layer)
    max_draft: int = 8  # drafts per round at most
    threshold: float | None = None  # adaptive: a row stops drafting once the exit's max softmax falls below this
    adapt_length: bool = False  # per row, the draft length follows the acceptance so far (`_Pace`), <= max_draft
    head_subset: object = None  # a `HeadSubset` (vocab.py): drafts score only its token ids; verification: full head

    def __post_init__(self):
        if self.max_draft < 1:
            raise FreeVLMError(f"draft length must be >= 1, got {self.max_draft}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise FreeVLMError(f"draft confidence threshold must lie in [0, 1], got {self.threshold}")


@dataclass
class SpeculativeStats:
    """What a speculative run did, summed over rows and rounds."""

    rounds: int = 0  # verifications (one per row per round)
    drafted: int = 0  # draft tokens proposed (none past a drafted EOS or past what a row may still emit)
    accepted: int = 0  # drafts the full model agreed with (each one emitted)
    tokens: int = 0  # tokens emitted (after the prefill's first)
    layer_calls: int = 0  # backbone layer x token calls (drafting + verification)
    exit_calls: int = 0  # exit-transformer x token calls
    per_round: list[int] = field(default_factory=list)  # tokens emitted per verification

    def add(self, other: SpeculativeStats | None) -> None:
        if other is None:
            return
        for name in ("rounds", "drafted", "accepted", "tokens", "layer_calls", "exit_calls"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.per_round.extend(other.per_round)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_verification(self) -> float:
        return self.tokens / self.rounds if self.rounds else 0.0

    def layer_calls_per_token(self, num_layers: int) -> float:
        """Layer calls (backbone + exit transformer) per generated token; full depth is N."""
        return (self.layer_calls + self.exit_calls) / self.tokens if self.tokens else float(num_layers)

    def to_json(self, num_layers: int) -> dict:
        return {"rounds": self.rounds, "drafted": self.drafted, "accepted": self.accepted, "tokens": self.tokens,
                "acceptance_rate": self.acceptance_rate, "tokens_per_verification": self.tokens_per_verification,
                "layer_calls_per_token": self.layer_calls_per_token(num_layers)}


def _warp(procs, logits: torch.Tensor) -> torch.Tensor:
    """Warped probabilities (R, ..., V) through transformers' warpers (they take 2D scores)."""
    shape = logits.shape
    flat = logits.reshape(-1, shape[-1]).float()
    if len(procs):
        flat = procs(None, flat)
    return torch.softmax(flat, dim=-1).reshape(shape)


def _check_settings(s) -> None:
    if s.num_beams > 1:
        raise FreeVLMError("speculative mode decodes greedily or by sampling; num_beams must be 1")
    if s.repetition_penalty != 1.0 or s.no_repeat_ngram_size or s.min_new_tokens:
        raise FreeVLMError("speculative mode supports temperature / top-k / top-p only (no repetition penalty, "
                           "no_repeat_ngram_size or min_new_tokens)")


@torch.no_grad()
def speculative_decode(engine: Engine, first_logits: torch.Tensor, s, draft: DraftSettings,
                       stats: SpeculativeStats) -> tuple[torch.Tensor, list[int]]:
    """Decode after the prefill (`engine` built with `draft_layer`); returns ids (R, T) padded, and row lengths."""
    _check_settings(s)
    k, n, e = engine.kernel, engine.n, draft.layer
    ex = engine.exit_at[e]
    cache = engine.cache
    b, device = first_logits.shape[0], first_logits.device
    procs = s.processors(beams=False)
    eos = torch.tensor(s.eos_token_id, dtype=torch.long, device=device)
    eos_set = set(s.eos_token_id)
    subset = draft.head_subset
    out = torch.full((b, s.max_new_tokens), s.pad_token_id, dtype=torch.long, device=device)
    if s.do_sample:
        cur = torch.multinomial(_warp(procs, first_logits), 1)[:, 0]
    else:
        cur = first_logits.float().argmax(-1)
    out[:, 0] = cur
    emitted = [1] * b
    done = (torch.isin(cur, eos) if eos.numel() else torch.zeros(b, dtype=torch.bool, device=device)).tolist()
    done = [d or s.max_new_tokens == 1 for d in done]
    lengths = cache.lengths.tolist()  # host copy of the per-row columns: no device sync to plan a round
    pace = _Pace(b, draft)
    while not all(done):
        rows_list = [r for r in range(b) if not done[r]]
        r_count = len(rows_list)
        rows = None if r_count == b else torch.tensor(rows_list, device=device)  # None: every row (no gathers)
        starts = [lengths[r] for r in rows_list]
        aligned = starts[0] if len(set(starts)) == 1 else None  # same columns for every row: slices, not scatters
        start = torch.tensor(starts, device=device)  # (R,) the column of each row's current token
        span_at = functools.partial(_span_at, engine, rows, aligned, start)

        # each row drafts at most `cap` tokens: the draft length (per row when it adapts to acceptance) and never
        # more than it can still emit (the verifier adds one token after the last kept draft)
        cap = [min(pace.length(r), s.max_new_tokens - emitted[r] - 1) for r in rows_list]
        count = [0] * r_count  # drafts made per row this round
        fed = list(range(r_count))  # rows (indices into rows_list) whose next block token runs through 1..e
        low = [False] * r_count  # the exit's confidence fell below draft.threshold: the row drafts no more
        eos_end = [False] * r_count  # the row's last draft is an EOS (not fed: nothing after it is emitted)
        tok = cur if rows is None else cur[rows]  # (R,) each row's next block token
        hs, drafts, draft_probs = [], [], []
        i = 0
        while fed:
            every = len(fed) == r_count
            if every:
                span, tok_in = span_at(i), tok
            else:
                idx = torch.tensor(fed, device=device)
                span, tok_in = _sub_span(engine, rows, aligned, start, idx, i), tok[idx]
            h = k.embed_tokens(tok_in[:, None], span.positions)
            for layer in range(1, e + 1):
                h = engine.run_layer(layer, h, span)
            if not every:  # rows that stopped feeding get zeros here: later positions never reach their kept tokens
                h = torch.zeros((r_count, 1, h.shape[-1]), dtype=h.dtype, device=device).index_copy_(0, idx, h)
            hs.append(h)
            drafting = [j for j in fed if count[j] < cap[j] and not low[j]]
            if not drafting:
                break
            if len(drafting) == r_count:
                dspan, dh, didx = span, h, None
            else:
                didx = torch.tensor(drafting, device=device)
                dspan, dh = _sub_span(engine, rows, aligned, start, didx, i), h[didx]
            state = engine.run_exit(ex, dh, dspan) if ex.uses_cache else dh
            lg = ex.logits(k, state[:, -1], subset).float()  # (D, V), or (D, K) over the subset's ids
            if s.do_sample:  # the draft distribution q is the subset's, zero elsewhere: the acceptance rule holds
                q = _warp(procs, lg if subset is None else subset.scatter(lg))
                new_tok = torch.multinomial(q, 1)[:, 0]
                conf = q.amax(-1)
            else:
                new_tok = lg.argmax(-1) if subset is None else subset.token(lg.argmax(-1))
                conf = torch.softmax(lg, -1).amax(-1) if draft.threshold is not None else None
            if didx is None:
                tok, q_all = new_tok, (q if s.do_sample else None)
            else:
                tok = torch.full_like(tok, s.pad_token_id).index_copy_(0, didx, new_tok)
                q_all = q.new_zeros((r_count, q.shape[-1])).index_copy_(0, didx, q) if s.do_sample else None
            drafts.append(tok)
            if s.do_sample:
                draft_probs.append(q_all)
            ends = set()
            if eos_set:  # a row that drafted EOS stops: nothing after it could be emitted
                ended = torch.isin(new_tok, eos).tolist()
                ends = {j for j, x in zip(drafting, ended) if x}
                for j in ends:
                    eos_end[j] = True
            if draft.threshold is not None:
                for j, c in zip(drafting, (conf < draft.threshold).tolist()):
                    low[j] = low[j] or c
            for j in drafting:
                count[j] += 1
            fed = [j for j in fed if j in drafting and j not in ends]  # the last draft is fed, to verify the next
            i += 1
        m = len(hs)  # block: the current token + up to m - 1 drafts per row (m when every row's last one was an EOS)
        nd = len(drafts)
        block = torch.cat(hs, 1)  # (R, m, D)
        span = span_at(0, m)
        x = block
        for layer in range(e + 1, n + 1):
            x = engine.run_layer(layer, x, span)
        final = k.logits(x).float()  # (R, m, V)
        d = torch.stack(drafts, 1) if drafts else torch.zeros((r_count, 0), dtype=torch.long, device=device)
        drafted = torch.tensor(count, device=device)  # (R,) each row's drafts (the rest of its block is padding)
        ar = torch.arange(r_count, device=device)
        if s.do_sample:
            p = _warp(procs, final)  # (R, m, V)
            if nd:
                q = torch.stack(draft_probs, 1)  # (R, nd, V)
                p_d = p[:, :nd].gather(-1, d[..., None])[..., 0]
                q_d = q.gather(-1, d[..., None])[..., 0]
                ok = torch.rand_like(p_d) < (p_d / q_d).clamp(max=1.0)
                kept = torch.minimum(ok.long().cumprod(1).sum(1), drafted)  # (R,)
            else:
                kept = torch.zeros(r_count, dtype=torch.long, device=device)
            at = p[ar, kept.clamp(max=m - 1)]  # (R, V) target distribution at the first reject (past m: an EOS kept)
            if nd:
                qd = torch.cat([q, torch.zeros_like(q[:, :1])], 1)[ar, kept]
                rejected = (kept < drafted)[:, None]
                resid = torch.where(rejected, (at - qd).clamp(min=0), at)
                resid = torch.where(resid.sum(-1, keepdim=True) > 0, resid, at)  # p == q: nothing to correct
                at = resid / resid.sum(-1, keepdim=True)
            nxt = torch.multinomial(at, 1)[:, 0]
        else:
            f = final.argmax(-1)  # (R, m)
            kept = torch.minimum((d == f[:, :nd]).long().cumprod(1).sum(1), drafted) if nd else torch.zeros(
                r_count, dtype=torch.long, device=device)
            nxt = f[ar, kept.clamp(max=m - 1)]  # kept = m: the row kept its EOS and ends there
        kept_list = kept.tolist()
        # every draft kept and the last one fed (not an EOS): that last block token's exit K/V are still missing
        full = [kept_list[j] == count[j] and not eos_end[j] for j in range(r_count)]
        if ex.uses_cache and any(full):
            sel = torch.tensor([j for j in range(r_count) if full[j]], device=device)
            pos = drafted[sel]
            last = engine.span(sel if rows is None else rows[sel], (start[sel] + pos)[:, None])
            engine.run_exit(ex, block[sel, pos][:, None], last)  # only its K/V are needed: what this layer writes
        new = torch.zeros((r_count, nd + 1), dtype=torch.long, device=device)
        new[:, :nd] = d
        new[ar, kept] = nxt
        new_rows = new.tolist()
        _finish_round(engine, stats, pace, s, out, emitted, done, lengths, rows_list, count, kept_list, new_rows,
                      eos_end, full, m, subset)
        cache.set_lengths(torch.tensor(lengths, device=device))
        if rows is None:
            cur = nxt
        else:
            cur[rows] = nxt
    steps = max(emitted)
    return out[:, :steps], emitted


def _finish_round(engine, stats, pace, s, out, emitted, done, lengths, rows_list, count, kept_list, new_rows,
                  eos_end, full, m, subset) -> None:
    """A round's bookkeeping, whichever path ran it: statistics, the work log, each row's pace, the tokens it emits
    (its kept drafts, then the full model's next token; up to an EOS or the token budget) and its new length."""
    e = engine.exit_list[0]
    ex = engine.exit_at[e]
    eos_set = set(s.eos_token_id)
    stats.rounds += len(rows_list)
    stats.drafted += sum(count)
    stats.accepted += sum(kept_list)
    stats.layer_calls += sum(e * (c + (0 if end else 1)) for c, end in zip(count, eos_end))
    stats.layer_calls += (engine.n - e) * m * len(rows_list)
    if ex.uses_cache:
        stats.exit_calls += sum(count) + sum(full)
    engine.log.append(_speculative_log(engine, rows_list, out.shape[0], e, m, count, eos_end, full, ex.uses_cache,
                                       1.0 if subset is None else subset.fraction))
    for j, r in enumerate(rows_list):
        pace.update(r, kept_list[j], count[j])
        emitted_now = 0
        for t in new_rows[j][: kept_list[j] + 1]:
            if emitted[r] >= s.max_new_tokens:
                break
            out[r, emitted[r]] = t
            emitted[r] += 1
            emitted_now += 1
            if t in eos_set:
                done[r] = True
                break
        if emitted[r] >= s.max_new_tokens:
            done[r] = True
        stats.tokens += emitted_now
        stats.per_round.append(emitted_now)
        engine.log[-1].tokens[r] = emitted_now
        lengths[r] += kept_list[j] + 1


def static_speculative_decode(engine: Engine, first_logits: torch.Tensor, s, draft: DraftSettings,
                              stats: SpeculativeStats) -> tuple[torch.Tensor, list[int]]:
    """Greedy speculative decoding through `graphs.StaticSpeculative` (CUDA graphs on a GPU): the same tokens,
    statistics and work log as `speculative_decode`, one host transfer per round."""
    _check_settings(s)
    b, device = first_logits.shape[0], first_logits.device
    eos_set = set(s.eos_token_id)
    step = engine.static_rounds = engine.buffers.rounds(engine, draft.layer, draft.max_draft, draft.threshold,
                                                        draft.head_subset, s.eos_token_id)
    out = torch.full((b, s.max_new_tokens), s.pad_token_id, dtype=torch.long, device=device)
    cur = first_logits.float().argmax(-1).tolist()
    out[:, 0] = torch.tensor(cur, device=device)
    emitted = [1] * b
    done = [t in eos_set or s.max_new_tokens == 1 for t in cur]
    lengths = engine.cache.lengths.tolist()
    pace = _Pace(b, draft)
    while not all(done):
        rows_list = [r for r in range(b) if not done[r]]
        caps = [0 if done[r] else min(pace.length(r), s.max_new_tokens - emitted[r] - 1) for r in range(b)]
        inputs = to_device([cur, lengths, caps], device)  # one copy to the device per round, no sync
        result = step.round(inputs[0], inputs[1], inputs[2])  # per row: kept, drafted, next, drafts
        count = [result[r][1] for r in rows_list]
        kept_list = [result[r][0] for r in rows_list]
        eos_end = [c > 0 and result[r][2 + c] in eos_set for r, c in zip(rows_list, count)]
        full = [k == c and not end for k, c, end in zip(kept_list, count, eos_end)]
        m = max(c + (0 if end else 1) for c, end in zip(count, eos_end))  # the dynamic path's block width
        new_rows = [result[r][3: 3 + kept_list[j]] + [result[r][2]] for j, r in enumerate(rows_list)]
        _finish_round(engine, stats, pace, s, out, emitted, done, lengths, rows_list, count, kept_list, new_rows,
                      eos_end, full, m, draft.head_subset)
        for r in rows_list:
            cur[r] = result[r][2]
    engine.cache.set_lengths(torch.tensor(lengths, device=device))
    return out[:, : max(emitted)], emitted


def _sub_span(engine, rows, aligned: int | None, start: torch.Tensor, idx: torch.Tensor, offset: int):
    """One token per row for the rows `idx` (indices into the round's rows), `offset` columns after their current
    token."""
    sub = idx if rows is None else rows[idx]
    if aligned is not None:
        return engine.aligned_span(sub, aligned + offset, 1)
    return engine.span(sub, (start[idx] + offset)[:, None])


class _Pace:
    """Each row's draft length. `max_draft` unless `adapt`: then it follows a running estimate of the row's
    per-draft acceptance probability a, counting kept drafts as successes and the first rejected draft as a failure
    (drafts after it are unobserved), both counts decaying by half every round; the length is round(a / (1 - a)) + 1
    clamped to 1..max_draft, a / (1 - a) being the expected run of kept drafts when each is kept with probability a.
    A row starts at max_draft."""

    def __init__(self, batch: int, draft: DraftSettings):
        self.max_draft, self.adapt = draft.max_draft, draft.adapt_length
        self.kept = [1.0] * batch
        self.rejected = [0.0] * batch

    def length(self, row: int) -> int:
        if not self.adapt or not self.rejected[row]:
            return self.max_draft
        return max(1, min(self.max_draft, round(self.kept[row] / self.rejected[row]) + 1))

    def update(self, row: int, kept: int, drafted: int) -> None:
        if self.adapt and drafted:
            self.kept[row] = 0.5 * self.kept[row] + kept
            self.rejected[row] = 0.5 * self.rejected[row] + (1.0 if kept < drafted else 0.0)


def _span_at(engine, rows, aligned: int | None, start: torch.Tensor, offset: int, q: int = 1):
    """The span of q tokens per row starting `offset` columns after each row's current token."""
    if aligned is not None:
        return engine.aligned_span(rows, aligned + offset, q)
    return engine.span(rows, start[:, None] + offset + torch.arange(q, device=start.device)[None])


def _speculative_log(engine, rows, b, e, m, drafted, eos_end, full, exit_cache, head_share: float = 1.0):
    """A round as a step record: per row, layer calls (its fed block tokens through 1..e: its drafts + 1, or just its
    drafts when the last is an EOS; the whole block of m through e+1..N), exit calls (its drafts, + 1 when every
    draft was kept: the last token's exit K/V) and heads (a draft head per draft, `head_share` of a full head each,
    + m verified)."""
    log = _SpeculativeLog(torch.full((b,), engine.n, dtype=torch.long), False, None)
    z = torch.zeros(b)
    log.layers, log.exits, log.heads, log.proj = z.clone(), z.clone(), z.clone(), z.clone()
    log.tokens, log.drafts = torch.zeros(b), torch.zeros(b)
    for j, r in enumerate(rows):
        fed = drafted[j] + (0 if eos_end[j] else 1)
        log.layers[r] = e * fed + (engine.n - e) * m
        log.exits[r] = (drafted[j] + (1 if full[j] else 0)) if exit_cache else 0
        log.heads[r] = drafted[j] * head_share + m
        log.drafts[r] = drafted[j]
    log.live = torch.tensor(rows)
    log.head_share = head_share
    return log


@dataclass
class _SpeculativeLog(_StepLog):
    layers: torch.Tensor | None = None
    exits: torch.Tensor | None = None
    heads: torch.Tensor | None = None
    proj: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    drafts: torch.Tensor | None = None  # (B,) drafts each row made in the round
    head_share: float = 1.0  # a draft head's cost in full heads (a subset head: K/V)
    live: torch.Tensor | None = None

    def record(self) -> StepRecord:
        b = self.exit_layer.shape[0]
        z = torch.zeros(b)
        return StepRecord(self.exit_layer.clone(), self.layers, self.exits, self.heads, self.proj, z, False,
                          self.tokens)
