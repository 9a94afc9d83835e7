"""Lossless self-speculative decoding with a FREE exit as the drafter.

A round, for every unfinished row:
1. draft: the current token and then each draft go through layers 1..e, the exit at e and the frozen head, which
   proposes the next token; up to `max_draft` drafts per row (with `adapt_length`, fewer for a row whose drafts
   were rejected early in past rounds), never more than the row can still emit, and a row stops drafting once the
   exit's confidence falls below `threshold` (adaptive) or it drafts an EOS (nothing after it could be emitted; the
   EOS itself is not fed on). Layers 1..e write their K/V as they go, and the exit transformer its own.
2. verify: layers e+1..N run once over the whole block (the current token + the drafts), starting from the h_e states
   the drafting already computed, so layers 1..e never run twice. Greedy: the drafts that equal the full model's
   argmax are kept, then the full model's own next token; sampling: the standard speculative-sampling rule (accept
   draft x with probability min(1, p(x)/q(x)), else sample the residual max(0, p - q)), so the output distribution
   is exactly plain sampling's. Acceptance statistics count only drafts a row could emit.
3. roll back: each row's cache length becomes its old length + kept tokens; the rejected drafts' K/V (backbone and
   exit caches) stay where they are and are overwritten by the next round, since attention never reads past a row's
   own column.

Two drivers, both built on the engine's segments (`Engine.run_segment`): greedy rounds are `graphs.StaticSpeculative`
(graphed on CUDA; eager elsewhere, trimmed to the feeds the rows need), and sampling runs `sampled_speculative_decode`,
where rows that stopped leave the drafting batch (their later block positions are zeros, which no token they keep
attends to) and, when every draft was kept, the last block token's exit K/V are written by one exit call.

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


@torch.no_grad()
def speculative_decode(engine: Engine, first_logits: torch.Tensor, s, draft: DraftSettings, stats: SpeculativeStats,
                       capture: bool = False) -> tuple[torch.Tensor, list[int]]:
    """Decode after the prefill (`engine` built with `draft_layer`) in `graphs.StaticSpeculative` rounds, one host
    transfer per round (`capture`: as CUDA graphs; greedy only); returns ids (R, T) padded, and row lengths."""
    _check_settings(s)
    b, device = first_logits.shape[0], first_logits.device
    eos_set = set(s.eos_token_id)
    capture = capture and not s.do_sample  # sampling rounds run eagerly
    step = engine.static_rounds = engine.buffers.rounds(engine, draft.layer, draft.max_draft, draft.threshold,
                                                        draft.head_subset, s.eos_token_id, capture)
    step.warp = functools.partial(_warp, s.processors(beams=False)) if s.do_sample else None
    out = torch.full((b, s.max_new_tokens), s.pad_token_id, dtype=torch.long, device=device)
    if s.do_sample:
        cur = torch.multinomial(step.warp(first_logits.float()), 1)[:, 0].tolist()
    else:
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
        result = step.round(inputs[0], inputs[1], inputs[2], lengths, caps, rows_list)  # kept, drafted, next, drafts
        count = [result[r][1] for r in rows_list]
        kept_list = [result[r][0] for r in rows_list]
        eos_end = [c > 0 and result[r][2 + c] in eos_set for r, c in zip(rows_list, count)]
        full = [k == c and not end for k, c, end in zip(kept_list, count, eos_end)]
        m = max(c + (0 if end else 1) for c, end in zip(count, eos_end))  # the block a trimmed round verifies
        new_rows = [result[r][3: 3 + kept_list[j]] + [result[r][2]] for j, r in enumerate(rows_list)]
        _finish_round(engine, stats, pace, s, out, emitted, done, lengths, rows_list, count, kept_list, new_rows,
                      eos_end, full, m, draft.head_subset)
        for r in rows_list:
            cur[r] = result[r][2]
    engine.cache.set_lengths(torch.tensor(lengths, device=device))
    return out[:, : max(emitted)], emitted


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
