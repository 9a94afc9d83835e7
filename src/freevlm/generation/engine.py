"""One decoding step with early exits: the layers a token runs, the exits it checks, and what its skipped layers get.

`ExitEngine.step` is called once per generated token for the whole batch (by `EarlyExitLM.forward`, which
transformers' `generate` drives). It walks the LM layer by layer; after an exit layer it asks the exit for its
distribution and the criterion whether to stop. Rows that leave keep the exit's logits as their prediction and run no
further layers; their skipped layers' K/V are filled according to the `SkipPolicy` (see `kv.py`).

The prompt's prefill always runs every layer (and every exit, to fill the exit caches), because later tokens need
the prompt's keys and values at every depth; the first generated token is still decided by the exits, as in the
paper. Work is recorded per row and per step in `StepRecord`s, in layer-call units that `eval/efficiency.py` turns
into speedups.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import Cache

from freevlm.backbones.base import LanguageModel, LayerContext
from freevlm.exits import ExitStack
from freevlm.generation.kv import SkipPolicy, append_kv, last_kv, rows_view, self_attention_cache


@dataclass
class StepRecord:
    """What one decoding step did for each row (B,) of the batch."""

    exit_layer: torch.Tensor  # layer whose prediction the row's token is (1..N; N = the final layer)
    layers: torch.Tensor  # backbone layer calls x tokens run for the row (catch-up tokens included)
    exit_layers: torch.Tensor  # exit-transformer layer calls x tokens
    heads: torch.Tensor  # LM-head applications (exit checks that computed logits, plus the final head)
    kv_projections: torch.Tensor  # skipped cache slots filled by propagation (one K/V projection pair each)
    kv_copies: torch.Tensor  # skipped cache slots filled by copying the exit layer's K/V
    prefill: bool = False  # True for the prompt's step (which runs every layer whatever the exits decide)

    @classmethod
    def zeros(cls, batch: int, num_layers: int, device, prefill: bool) -> StepRecord:
        z = lambda: torch.zeros(batch, device=device)  # noqa: E731
        full = torch.full((batch,), num_layers, dtype=torch.long, device=device)
        return cls(full, z(), z(), z(), z(), z(), prefill)


@dataclass
class _Pending:
    """A token whose deeper layers have not run yet (catch-up): its hidden state after layer `depth`."""

    depth: int
    hidden: torch.Tensor  # (B, 1, D)
    position_ids: torch.Tensor | None  # (B, 1) or None


@dataclass
class _Exited:
    """Rows that left during this step, with what the skip policy needs to fill their skipped slots."""

    rows: list[torch.Tensor] = field(default_factory=list)  # row indices, one tensor per exit event
    states: list[torch.Tensor] = field(default_factory=list)  # (R, 1, D) state to propagate
    layers: list[int] = field(default_factory=list)  # exit layer (1-based) of each event
    slots: list[int] = field(default_factory=list)  # exit-cache slot of each event (-1: the exit keeps no cache)


class ExitEngine:
    def __init__(self, lm: LanguageModel, exits: ExitStack | None, criterion, policy: SkipPolicy):
        self.lm = lm
        self.exits = exits
        self.criterion = criterion
        self.policy = policy
        self._exit_positions = torch.tensor(exits.layers if exits is not None else [], dtype=torch.long)
        self.reset()

    def reset(self) -> None:
        self.exit_cache: Cache | None = None
        self.pending: list[_Pending] = []
        self.records: list[StepRecord] = []
        self._last_mask: torch.Tensor | None = None
        self._encoder = None

    @property
    def checking(self) -> bool:
        return self.exits is not None and not self.criterion.never_exits()

    # ----------------------------------------------------------------------------------------------------------
    def step(self, h0, attention_mask, position_ids, cache: Cache, encoder=None, prefill: bool = False):
        """Run one step for the new tokens h0 (B, q, D); returns next-token logits (B, V) for the last position."""
        if prefill:
            self.reset()
            if self.checking and self.exits.uses_cache:
                self.exit_cache = self.lm.new_cache()
        self._last_mask, self._encoder = attention_mask, encoder
        rec = StepRecord.zeros(h0.shape[0], self.lm.num_layers, h0.device, prefill)
        if prefill or self.policy.batch_moves_together:
            logits = self._step_together(h0, attention_mask, position_ids, cache, encoder, rec, prefill)
        else:
            logits = self._step_per_row(h0, attention_mask, position_ids, cache, encoder, rec)
        self.records.append(rec)
        return logits

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Follow transformers' beam search: rows of the exit cache and pending states move with their beams."""
        if self.exit_cache is not None:
            self.exit_cache.reorder_cache(beam_idx)
        for p in self.pending:
            p.hidden = p.hidden.index_select(0, beam_idx.to(p.hidden.device))
            if p.position_ids is not None and p.position_ids.shape[0] > 1:
                p.position_ids = p.position_ids.index_select(0, beam_idx.to(p.position_ids.device))

    def flush(self, cache: Cache) -> None:
        """Catch-up only: run every pending token through the layers (and exits) it skipped, so that the caches
        equal a full-depth forward's. Generation does not need it; tests and cache hand-over do."""
        if not self.pending:
            return
        first = self.pending[-1].depth + 1  # the shallowest pending token joins first
        group = self._join(None, None, first - 1)
        hidden, pos = group
        for layer in range(first, self.lm.num_layers + 1):
            if layer > first:
                hidden, pos = self._join(hidden, pos, layer - 1)
            ctx = self._context(hidden, pos, layer - 1, cache, {})
            hidden = self.lm.run_layer(self.lm.layers[layer - 1], hidden, ctx, cache)
            exit_ = self.exits.at(layer) if self.exit_cache is not None else None
            if exit_ is not None and exit_.uses_cache:
                exit_.state(self.lm, hidden, ctx, self.exit_cache)
        self.pending = []

    # ----------------------------------------------------------------------------------------------------------
    def _context(self, hidden, position_ids, layer_idx, cache, memo) -> LayerContext:
        past = self_attention_cache(cache).get_seq_length(layer_idx)
        key = (hidden.shape[1], past)
        if key not in memo:
            mask = self._last_mask
            memo[key] = self.lm.context(hidden, mask, cache, layer_idx, position_ids, self._encoder)
        return memo[key]

    def _join(self, hidden, position_ids, depth):
        """Prepend the pending tokens that stopped after layer `depth` to the group entering layer depth + 1."""
        joiners = [p for p in self.pending if p.depth == depth]
        if not joiners:
            return hidden, position_ids
        parts = [p.hidden for p in joiners] + ([hidden] if hidden is not None else [])
        pos_parts = [p.position_ids for p in joiners] + ([position_ids] if hidden is not None else [])
        pos = None if any(p is None for p in pos_parts) else torch.cat(pos_parts, dim=1)
        return torch.cat(parts, dim=1), pos

    def _decide(self, exit_, layer, state, hidden, prev, rows, crit_state, rec, out):
        """Ask the criterion about `rows` (whose last-position states are given); returns the leaving mask."""
        logits = exit_.logits(self.lm, state) if self.criterion.needs_logits else None
        go = self.criterion(crit_state, rows, logits, hidden, prev)
        if go.any():
            leaving = rows[go]
            logits_go = exit_.logits(self.lm, state[go]) if logits is None else logits[go]
            out[leaving] = logits_go.to(out.dtype)
            rec.exit_layer[leaving] = layer
        return go

    def _final(self, hidden_last, rows, out):
        if rows.numel():
            out[rows] = self.lm.head(self.lm.final_norm(hidden_last)).to(out.dtype)

    def _account(self, rec: StepRecord, layer_tokens: int | None = None, exit_tokens: int | None = None) -> None:
        """Fill the step's work counts from each row's exit layer, once per step (not inside the layer loop).

        Per row: exits checked = exit layers <= its exit layer; heads = one per check that computed logits (one
        in all for criteria that decide without logits) plus the final head; under propagate/copy a row runs layers
        1..exit layer and its skipped slots (deeper layers, deeper exit transformers) are filled by the policy.
        The prefill and catch-up steps run the same layers for every row: `layer_tokens`/`exit_tokens` give them.
        """
        n = self.lm.num_layers
        exit_layer = rec.exit_layer
        reached_final = (exit_layer == n).to(rec.heads.dtype)
        if self.checking:
            positions = self._exit_positions.to(exit_layer.device)
            checked = torch.searchsorted(positions, exit_layer, right=True).to(rec.heads.dtype)
            rec.heads += (checked if self.criterion.needs_logits else (1 - reached_final)) + reached_final
        else:
            checked = torch.zeros_like(rec.heads)
            rec.heads += 1
        with_cache = self.checking and self.exits.uses_cache
        if layer_tokens is not None:
            rec.layers += layer_tokens
            rec.exit_layers += exit_tokens or 0
            return
        rec.layers += exit_layer.to(rec.layers.dtype)
        if with_cache:
            rec.exit_layers += checked
        skipped = (n - exit_layer).to(rec.layers.dtype)
        if with_cache:
            skipped = skipped + (len(self.exits.layers) - checked)
        if self.policy.name == "propagate":
            rec.kv_projections += skipped
        else:
            rec.kv_copies += skipped

    # ----------------------------------------------------------------------------------------------------------
    def _step_together(self, h0, mask, position_ids, cache, encoder, rec, prefill):
        """Prefill, and the catch-up policy: every row runs every layer this step runs (rows that exit ride along)."""
        lm, n, b = self.lm, self.lm.num_layers, h0.shape[0]
        checking = self.checking
        crit_state = self.criterion.new_step(b, h0.device) if checking else None
        out = torch.empty(b, lm.vocab_size, device=h0.device, dtype=h0.dtype)
        active = torch.arange(b, device=h0.device)
        hidden, pos = h0, position_ids
        memo: dict = {}
        stop = n
        layer_tokens = exit_tokens = 0
        for layer in range(1, n + 1):
            if not prefill:
                hidden, pos = self._join(hidden, pos, layer - 1)
            ctx = self._context(hidden, pos, layer - 1, cache, memo)
            prev = hidden
            hidden = lm.run_layer(lm.layers[layer - 1], hidden, ctx, cache)
            layer_tokens += hidden.shape[1]
            exit_ = self.exits.at(layer) if checking else None
            if exit_ is None:
                continue
            state = exit_.state(lm, hidden, ctx, self.exit_cache)
            if exit_.uses_cache:
                exit_tokens += hidden.shape[1]
            if active.numel():
                go = self._decide(
                    exit_, layer, state[active, -1], hidden[active, -1], prev[active, -1], active, crit_state, rec, out
                )
                active = active[~go]
            if not active.numel() and not prefill:
                stop = layer
                break
        self._final(hidden[active, -1], active, out)
        self._account(rec, layer_tokens, exit_tokens)
        if stop < n:  # catch-up: the whole group waits after `stop` for the next token that goes deep
            kept = [p for p in self.pending if p.depth >= stop]
            pos_cols = [None] * hidden.shape[1] if pos is None else [pos[:, k : k + 1] for k in range(pos.shape[1])]
            new = [_Pending(stop, hidden[:, k : k + 1], pos_cols[k]) for k in range(hidden.shape[1])]
            self.pending = kept + new
        elif not prefill:
            self.pending = []
        return out

    # ----------------------------------------------------------------------------------------------------------
    def _step_per_row(self, h0, mask, position_ids, cache, encoder, rec):
        """Propagation / copy: rows that exit stop running layers; their skipped slots get the policy's fill."""
        lm, n, b = self.lm, self.lm.num_layers, h0.shape[0]
        checking = self.checking
        crit_state = self.criterion.new_step(b, h0.device) if checking else None
        out = torch.empty(b, lm.vocab_size, device=h0.device, dtype=h0.dtype)
        active = torch.arange(b, device=h0.device)
        hidden = h0  # (A, 1, D): the active rows only
        exited = _Exited()
        ctx = self._context(h0, position_ids, 0, cache, {})  # every layer holds the same tokens: one context
        for layer in range(1, n + 1):
            if active.numel() == b:
                sub_ctx, layer_cache = ctx, cache
            else:
                sub_ctx = ctx.select_rows(active)
                fill = self._fill(lm.layers[layer - 1], layer - 1, cache, ctx, exited, b, exit_slot=None)
                layer_cache = rows_view(cache, active, fill)
            prev = hidden
            hidden = lm.run_layer(lm.layers[layer - 1], hidden, sub_ctx, layer_cache)
            exit_ = self.exits.at(layer) if checking else None
            if exit_ is None:
                continue
            exit_cache = self.exit_cache
            slot = getattr(exit_, "slot", -1)
            if exit_.uses_cache and active.numel() < b:
                fill = self._fill(exit_.layer, slot, self.exit_cache, ctx, exited, b, exit_slot=slot)
                exit_cache = rows_view(self.exit_cache, active, fill)
            state = exit_.state(lm, hidden, sub_ctx, exit_cache)
            go = self._decide(exit_, layer, state[:, -1], hidden[:, -1], prev[:, -1], active, crit_state, rec, out)
            if go.any():
                source = state if self.policy.source == "exit" else hidden
                exited.rows.append(active[go])
                exited.states.append(source[go])
                exited.layers.append(layer)
                exited.slots.append(slot)
                keep = ~go
                active, hidden = active[keep], hidden[keep]
            if not active.numel():
                self._fill_rest(layer, cache, ctx, exited, b)
                break
        self._final(hidden[:, -1], active, out)
        self._account(rec)
        return out

    def _fill(self, layer_module, slot, cache, ctx, exited: _Exited, batch, exit_slot):
        """Full-batch (K, V) for cache slot `slot` whose exited rows hold the policy's fill (others: zeros)."""
        keys = values = None
        for rows, state, exit_layer, src_slot in zip(exited.rows, exited.states, exited.layers, exited.slots):
            if self.policy.name == "propagate":
                k, v = self.lm.kv_projection(layer_module, state, ctx.select_rows(rows))
            else:  # copy: the K/V that the exit layer (for exit slots: the exit's own transformer) stored
                k, v = last_kv(cache, exit_layer - 1 if exit_slot is None else src_slot, rows)
            if keys is None:
                keys = k.new_zeros((batch, *k.shape[1:]))
                values = v.new_zeros((batch, *v.shape[1:]))
            keys = keys.index_copy(0, rows, k.to(keys.dtype))
            values = values.index_copy(0, rows, v.to(values.dtype))
        return keys, values

    def _fill_rest(self, stop, cache, ctx, exited, batch):
        """Every row has exited by layer `stop`: fill all deeper slots (backbone and exit caches) for all rows."""
        lm = self.lm
        for layer in range(stop + 1, lm.num_layers + 1):
            keys, values = self._fill(lm.layers[layer - 1], layer - 1, cache, ctx, exited, batch, exit_slot=None)
            append_kv(cache, layer - 1, keys, values)
            exit_ = self.exits.at(layer)
            if exit_ is not None and exit_.uses_cache and self.exit_cache is not None:
                slot = exit_.slot
                keys, values = self._fill(exit_.layer, slot, self.exit_cache, ctx, exited, batch, exit_slot=slot)
                append_kv(self.exit_cache, slot, keys, values)
