"""One decoding step with early exits, on the static cache: the layers a token runs, the exits it checks, and what
its skipped layers get.

The unit of work is the segment (`Engine.run_segment`): layers (a, b] and then the exit at b, if any. A step runs its
segments in turn, cut at the exits (`Engine.segments`), and one loop (`Engine._step`) decides between two: after an
exit the exit's distribution is computed and the criterion asked whether to stop (one host transfer per exit
decision); rows that leave keep the exit's logits as their prediction. `Engine.prefill` runs the prompt through every
segment (every layer and every exit, to fill the exit caches: later tokens need the prompt's K/V at every depth); the
first generated token is still decided by the exits, as in the paper. `Engine.step` then runs one new token per row,
eagerly or through the static step's graphs (`graphs.py`). What the leaving rows' skipped layers get in the cache is
the `SkipPolicy`'s (see `kv.py`):

- `propagate` / `copy`: rows leave one by one; the remaining rows run on (a smaller batch; all rows ride along in the
  static step); the exited rows' skipped slots are filled once the step is over, one batched write per exit event.
- `catch_up`: the batch moves together. A row that exits rides along with the rows still deciding (its token is
  chosen, its layers still run, so its K/V are exact); when every row has exited the step stops, and the deeper layers
  run later for those tokens, batched with the next token that goes deep (or at `flush()`).

Work is logged per step in layer-call units (`StepRecord`s, built on demand) for the compute speedup. With
`trace=True` every kernel call is recorded as ("layer" | "exit", 1-based layer, query tokens) for tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch

from freevlm.errors import FreeVLMError
from freevlm.generation.buffers import Buffers
from freevlm.generation.cache import KVCache, Span, make_span
from freevlm.generation.criteria import Gated
from freevlm.generation.events import ExitEvent
from freevlm.generation.graphs import to_device as _index
from freevlm.generation.kernels import kernel_for
from freevlm.generation.kernels.common import DecoderKernel, EncoderDecoderKernel, ExitKernel
from freevlm.generation.kv import SkipPolicy, fill_exit_kv, fill_skipped


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
    tokens: torch.Tensor | None = None  # tokens the step produced per row (None: one each; speculative rounds: more)
    gates: torch.Tensor | None = None  # exit gates asked (cheap predictors on h_i; see `planning/gates.py`)
    # steps where every row ran the same layers (catch-up): {q: calls} of backbone / exit layers over q tokens per
    # row, so a cost model can price blocks (one layer over q tokens costs far less than q layer calls)
    blocks: dict[int, int] | None = None
    exit_blocks: dict[int, int] | None = None

    def __post_init__(self):
        if self.gates is None:
            self.gates = torch.zeros_like(self.layers)

    @classmethod
    def zeros(cls, batch: int, num_layers: int, device, prefill: bool) -> StepRecord:
        z = lambda: torch.zeros(batch, device=device)  # noqa: E731
        full = torch.full((batch,), num_layers, dtype=torch.long, device=device)
        return cls(full, z(), z(), z(), z(), z(), prefill)


@dataclass
class _StepLog:
    exit_layer: torch.Tensor  # (B,) long
    prefill: bool
    # when every row ran the same layers: {q: calls} of backbone and of exit layers over q tokens per row
    together: tuple[dict[int, int], dict[int, int]] | None
    gates: list | None = None  # gated steps: (exit layer, batch rows, gate open per row) per gate asked
    owed_filled: list | None = None  # lazy exit filling: rows (one entry per K/V pair) whose owed exit K/V were written


@dataclass
class WorkLog:
    """What one generate call ran, step by step, and what reading it as work counts needs: statistics only (no cache,
    no model, no graphs), so that a result does not keep its engine alive and the engine's buffers can serve the next
    call (`session.py`)."""

    entries: list[_StepLog]  # per step, step 0 the prompt's prefill (speculative rounds: `_SpeculativeLog`s)
    num_layers: int
    exit_list: list[int]  # the exits that ran (checked, or the drafting one)
    checking: bool  # exits decided (early exit)
    needs_logits: bool  # the criterion read the exits' logits (one head per check)
    head_subset: object  # the `HeadSubset` exit checks and drafts scored (None: the full head)
    uses_exit_cache: bool
    lazy_exit_fill: bool
    policy: str  # the skip policy's name
    static: bool = False  # static steps (or static speculative rounds) ran
    graphed: bool = False  # ... captured as CUDA graphs
    pending: int = 0  # catch-up: tokens whose deeper layers had not run when decoding ended
    owed_exit_kv: int = 0  # lazy exit filling: exit K/V pairs closed gates still owed when decoding ended

    def records(self) -> list[StepRecord]:
        """The log as per-row work counts (see `eval/efficiency.py` for how they become the compute speedup).

        Per row: exits checked = exit layers <= its exit layer; heads = one per check that computed logits (one in
        all for criteria that decide without logits; a subset head counts K/V of one) plus the final head; under
        propagate/copy a row runs layers 1..exit layer and its skipped slots (deeper layers, deeper exit transformers)
        are filled by the policy. The prefill and catch-up steps run the same layers for every row (their logged token
        counts).
        """
        positions = torch.tensor(self.exit_list if self.checking else [], dtype=torch.long)
        n_exits = len(self.exit_list)
        needs_logits = self.needs_logits
        share = 1.0 if self.head_subset is None else self.head_subset.fraction  # an exit check's head, in full heads
        out = []
        for entry in self.entries:
            if hasattr(entry, "record"):  # speculative rounds count their own work
                out.append(entry.record())
                continue
            exit_layer = entry.exit_layer.cpu()
            b = exit_layer.shape[0]
            rec = StepRecord.zeros(b, self.num_layers, "cpu", entry.prefill)
            rec.exit_layer = exit_layer.clone()
            reached_final = (exit_layer == self.num_layers).float()
            if self.checking:
                checked = torch.searchsorted(positions, exit_layer, right=True).float()
                rec.heads += (checked if needs_logits else (1 - reached_final)) * share + reached_final
            else:
                checked = torch.zeros(b)
                rec.heads += 1
            opened = None
            if entry.gates is not None:  # a gate was asked at each exit reached; only open ones were checked
                opened = torch.zeros(b)
                for _, rows, is_open in entry.gates:
                    opened.index_add_(0, rows.cpu(), is_open.float().cpu())
                rec.gates += checked
                rec.heads = (opened if needs_logits else 1 - reached_final) * share + reached_final
            if entry.together is not None:
                rec.blocks, rec.exit_blocks = entry.together
                rec.layers += sum(q * calls for q, calls in rec.blocks.items())
                rec.exit_layers += sum(q * calls for q, calls in rec.exit_blocks.items())
            else:
                rec.layers += exit_layer.float()
                if opened is not None:
                    if self.uses_exit_cache:
                        rec.exit_layers += opened
                        if not self.lazy_exit_fill:
                            rec.kv_projections += checked - opened  # closed exits' K/V, projected from h_i
                elif self.uses_exit_cache:
                    rec.exit_layers += checked
                skipped = (self.num_layers - exit_layer).float()
                if self.uses_exit_cache:
                    skipped = skipped + (n_exits - checked)
                if self.policy == "propagate":
                    rec.kv_projections += skipped
                else:
                    rec.kv_copies += skipped
            if entry.owed_filled:  # lazy filling: exit K/V closed gates owed, projected (batched) during this step
                filled = torch.cat(entry.owed_filled).cpu()
                rec.kv_projections.index_add_(0, filled, torch.ones(filled.numel()))
            out.append(rec)
        return out


def prompt_positions(lm_inputs, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt's position ids and (B, 1) the position of the first generated token (the next ones follow it).

    `positions` (B, P) count each row's real tokens from 0 (padding: -1); an LM with multimodal RoPE (Qwen2-VL) brings
    its own (3, B, P) in `lm_inputs.position_ids`, and a generated token's position is then one past the row's largest
    (transformers' `rope_deltas`), the same in all three sections: decoding is 1-D RoPE with a per-row offset."""
    if lm_inputs.position_ids is None:
        return positions, positions.amax(1, keepdim=True) + 1
    mrope = lm_inputs.position_ids.to(positions.device)
    return mrope, mrope.amax((0, 2))[:, None].long() + 1


def _pick(t: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    return t if index is None else t[index]


@dataclass
class _Pending:
    """Catch-up: a token whose layers after `depth` have not run yet, with its state after layer `depth`."""

    depth: int
    col: int
    hidden: torch.Tensor  # (B, 1, D)


class Engine:
    """Decodes a batch on one backbone LM with (optionally) its exits. One instance per generate call."""

    def __init__(self, lm, exits=None, criterion=None, policy: SkipPolicy | None = None, *, trace: bool = False,
                 draft_layer: int | None = None, static: bool | None = None, check_layers: list[int] | None = None,
                 head_subset=None, lazy_exit_fill: bool = True):
        """`draft_layer`: speculative decoding's drafting exit; only its cache is kept, and no exit decides.
        `static`: decode steps with static shapes (`graphs.py`), as CUDA graphs on a GPU; default: on CUDA.
        `check_layers`: the exits to check (a subset of the trained ones, e.g. a plan's); the others never run.
        `head_subset`: exit checks score only these token ids (a `HeadSubset`, `vocab.py`); an exit that fires emits
        the subset's argmax (its logits elsewhere are -inf).
        `lazy_exit_fill`: a closed gate leaves its exit's K/V pending (the exit's input state is kept) and they are
        projected in one batched call when that exit next runs (or at `flush`); False projects them at once."""
        self.lm = lm
        self.kernel: DecoderKernel = kernel_for(lm)  # shared by every engine on `lm`: no per-call state on it
        self.tables = None  # this call's tables from `kernel.start` (RoPE, T5's relative bias)
        self.kv_stacks: dict = {}  # the stacked K/V projections propagation uses, checked fresh once per call (kv.py)
        self.n = lm.num_layers
        self.policy = policy or SkipPolicy()
        self.checking = exits is not None and criterion is not None and not criterion.never_exits()
        self.criterion = criterion
        self.head_subset = head_subset
        self.exits_owner = exits  # the ExitStack (owner of the exits' stacked propagation weights)
        self.exit_at: dict[int, ExitKernel] = {}
        self.exit_list: list[int] = []
        if draft_layer is not None:
            self.checking = False
            if exits is None or draft_layer not in exits.layers:
                raise FreeVLMError(f"draft exit layer {draft_layer} is not one of the exits "
                                   f"({list(exits.layers) if exits is not None else 'no exits loaded'})")
            self.exit_list = [draft_layer]
            self.exit_at[draft_layer] = ExitKernel(exits.at(draft_layer), self.kernel, 0)
        elif self.checking:
            self.exit_list = list(exits.layers) if check_layers is None else sorted(set(check_layers))
            unknown = [x for x in self.exit_list if x not in exits.layers]
            if unknown or not self.exit_list:
                raise FreeVLMError(f"exits to check {check_layers} must be a non-empty subset of the trained exits "
                                   f"{list(exits.layers)}")
            for i, layer in enumerate(self.exit_list):
                self.exit_at[layer] = ExitKernel(exits.at(layer), self.kernel, i)
        self.gated = self.checking and isinstance(criterion, Gated)  # a gate decides whether an exit is checked
        self.fills_exits = bool(self.exit_at)  # the prefill runs the exits (to fill their caches)
        self.uses_exit_cache = any(e.uses_cache for e in self.exit_at.values())
        self.calls: list[tuple[str, int, int]] | None = [] if trace else None
        self.log: list[_StepLog] = []
        self.pending: list[_Pending] = []
        self.lazy_exit_fill = lazy_exit_fill
        # closed gates' exit K/V not written yet, per exit slot: (rows, cols, input states, RoPE or None) groups
        self.exit_owed: dict[int, list[tuple]] = {}
        self._filled_rows: list[torch.Tensor] = []  # rows whose owed exit K/V were projected during this step
        self.cache: KVCache | None = None
        self.buffers: Buffers | None = None  # where the cache, offsets, tables and static steps live (`buffers.py`)
        self._rows: torch.Tensor | None = None
        self.static = static
        self._static_step = None
        self.static_rounds = None  # speculative decoding's static rounds (`graphs.StaticSpeculative`), when used
        self._prefill_last: torch.Tensor | None = None  # (B,) last real prompt column, when not every row's is p-1

    # ----------------------------------------------------------------------------------------------------------
    def prefill(self, lm_inputs, max_new_tokens: int, extra_columns: int = 0, buffers: Buffers | None = None
                ) -> torch.Tensor:
        """Run the prompt; returns the first token's logits (B, V). The cache has room for `max_new_tokens` more
        columns (+ `extra_columns`, e.g. speculative drafts past the last kept token): in `buffers` (a decode session's
        entry, which may have more columns and is reset, not reallocated), else allocated for exactly that."""
        k, lm = self.kernel, self.lm
        dtype = k.dtype  # the cache holds what the layers write: the weights' dtype, whatever the inputs'
        embeds, mask = lm_inputs.inputs_embeds.to(dtype), lm_inputs.attention_mask
        b, device = embeds.shape[0], embeds.device
        num_exit_slots = len(self.exit_list) if self.uses_exit_cache else 0
        if lm.is_encoder_decoder:
            k = cast(EncoderDecoderKernel, k)  # its layers cross-attend to the encoder output
            encoder = lm.encode(embeds, mask)  # the encoder runs whole, through transformers' module
            start = torch.full((b, 1), lm.config.decoder_start_token_id, dtype=torch.long, device=device)
            p = 1
            cache = self._cache(b, p + max_new_tokens + extra_columns, num_exit_slots, dtype, device, buffers)
            cache.put("encoder_bias", k.encoder_bias(mask, dtype))
            ck, cv = zip(*(k.cross_kv(w, encoder) for w in k.layers))
            cache.put("cross_keys", torch.stack(ck))
            cache.put("cross_values", torch.stack(cv))
            if num_exit_slots:
                eck, ecv = zip(*(k.cross_kv(self.exit_at[layer].layer, encoder) for layer in self.exit_list))
                cache.put("exit_cross_keys", torch.stack(eck))
                cache.put("exit_cross_values", torch.stack(ecv))
            positions = torch.zeros((b, 1), dtype=torch.long, device=device)
            h0 = k.embed(k.embed_tokens(start, positions), positions)
            base = torch.zeros((b, 1), dtype=torch.long, device=device)  # position = column for T5
        else:
            p = embeds.shape[1]
            cache = self._cache(b, p + max_new_tokens + extra_columns, num_exit_slots, dtype, device, buffers)
            real = mask.bool()
            cache.not_pad[:, :p] = real
            cache.has_pad = not bool(real.all())
            # A row whose prompt ends in padding (BLIP-2 puts padding between the image and the text, so a row with
            # an empty text and no BOS ends in it) reads its first token at its last real column, as it would alone.
            self._prefill_last = None
            if cache.has_pad and not bool(real[:, -1].all()):
                self._prefill_last = p - 1 - torch.flip(real, [1]).long().argmax(1)
            positions = (torch.cumsum(mask, 1) * mask - 1).long()  # as transformers: real tokens count from 0
            h0 = k.embed(embeds, positions)
            positions, first = prompt_positions(lm_inputs, positions)
            base = first - p  # a generated token at column c has position c + base
        self._base = self.buffers.base(base)
        self.cache = cache
        self.prompt_len = p
        self._rows = torch.arange(b, device=device)
        span = self._prepare(make_span(cache, p, positions, start=0))
        logits = self._step(h0, span, prefill=True)
        cache.advance(p)
        return logits

    def open_rows(self, b: int, buffers: Buffers, device: torch.device) -> None:
        """Continuous batching (`session.RowBatch`): `b` empty rows over `buffers`, which prompts are admitted into
        (`admit`) between steps. Decoder-only LMs: T5's cross-attention K/V have the encoder's length, one per row."""
        if self.lm.is_encoder_decoder:
            raise FreeVLMError("rows are admitted between steps for decoder-only LMs only (T5's encoder output has "
                               "its own length per prompt)")
        if self.policy.batch_moves_together:
            raise FreeVLMError("rows are admitted between steps under the propagate or copy policies (catch-up "
                               "moves the whole batch's pending tokens together)")
        exit_slots = len(self.exit_list) if self.uses_exit_cache else 0
        self.cache = self._cache(b, buffers.max_len, exit_slots, self.kernel.dtype, device, buffers)
        self.cache.has_pad = True  # rows hold masked columns (before their prompts)
        self._base = self.buffers.base(torch.zeros((b, 1), dtype=torch.long, device=device))
        self._rows = torch.arange(b, device=device)

    def admit(self, row: int, lm_inputs) -> torch.Tensor:
        """Continuous batching: prefill one prompt (`lm_inputs` of one row) into batch row `row`; returns its first
        token's logits (1, V). Every row writes the same column each step (the static step's shape), so the prompt
        sits right-aligned before the batch's next column, the columns before it masked as left padding, its positions
        counting from its own first token: it decodes as it would alone. A prompt longer than the columns used so far
        first makes every row skip the difference (masked columns; positions do not move)."""
        cache, k = self.cache, self.kernel
        embeds, mask = lm_inputs.inputs_embeds.to(k.dtype), lm_inputs.attention_mask
        p, device = embeds.shape[1], embeds.device
        col = cache.length
        if col < p:
            cache.not_pad[:, col:p] = False
            self._base -= p - col  # in place: the static step's graphs read this tensor
            cache.advance(p - col)
            col = p
        start = col - p
        real = mask[0].bool()
        cache.not_pad[row, :start] = False  # what the row held before (a released prompt, or nothing)
        cache.not_pad[row, start:col] = real
        positions = (torch.cumsum(mask, 1) * mask - 1).long()
        h0 = k.embed(embeds, positions)
        positions, first = prompt_positions(lm_inputs, positions)
        self._base[row] = first[0] - col  # a generated token at column c has position c + base
        self._prefill_last = None if bool(real[-1]) else (p - 1 - torch.flip(real, [0]).long().argmax()).view(1)
        rows, every = torch.tensor([row], device=device), self._rows
        self._rows = torch.arange(1, device=device)  # the prefill's own rows (its criterion state has one)
        try:
            span = self._prepare(make_span(cache, p, positions, start=start, rows=rows))
            return self._step(h0, span, prefill=True)
        finally:
            self._rows = every

    def _cache(self, b: int, columns: int, exit_slots: int, dtype, device, buffers: Buffers | None) -> KVCache:
        """The prompt rows' cache (and this call's tables) from `buffers`, or from new ones of exactly `columns`."""
        self.buffers = buffers if buffers is not None else Buffers(columns)
        max_len = self.buffers.max_len
        if max_len < columns:
            raise FreeVLMError(f"decode buffers of {max_len} columns cannot hold a call needing {columns}")
        k = self.kernel
        cache = self.buffers.cache(b, lambda: KVCache.allocate(self.n, exit_slots, b, k.kv_heads, max_len, k.head_dim,
                                                               dtype, device))
        self.tables = self.buffers.table(lambda: k.start(max_len, device))
        return cache

    def _static_ok(self) -> bool:
        if self.static is None:
            self.static = self.cache.keys.device.type == "cuda"
        return (self.static and not self.policy.batch_moves_together and self.cache.length is not None
                and self.kernel.static_rope and not self.gated)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One new token per row (B,) at the next column; returns next-token logits (B, V)."""
        cache, col = self.cache, self.cache.length
        if self._static_ok():
            if self._static_step is None or self._static_step.keys is not cache.keys:
                self._static_step = self.buffers.step(self)
            self._static_step.load(tokens, col)
            logits = self._step(None, None, static=self._static_step)
        else:
            positions = self._base + col  # (B, 1)
            h0 = self.kernel.embed_tokens(tokens[:, None], positions)
            logits = self._step(h0, self._prepare(make_span(cache, 1, positions, start=col)))
        cache.advance(1)
        return logits

    def reorder(self, index: torch.Tensor) -> None:
        """Rows follow `index` (beam search; expanding rows to beams or samples)."""
        self.fill_owed_exits()  # owed entries name rows by their old index
        base = self._base.index_select(0, index)
        if index.shape[0] != self.cache.batch:  # expanding: into the buffers' cache of that many rows
            self.cache = self.buffers.expand(self.cache, index)
            self._base = self.buffers.base(base)
        else:
            # the static step's graphs read these addresses (a session's entry: the graphs of an earlier call)
            in_place = self._static_step is not None or (self.buffers.kept and self._static_ok())
            self.cache.reorder(index, in_place=in_place)
            self._base = self._base.copy_(base) if in_place else base
        self._rows = torch.arange(index.shape[0], device=index.device)
        for p in self.pending:
            p.hidden = p.hidden.index_select(0, index)

    def expand_log(self, index: torch.Tensor) -> None:
        """After expanding the prefill's rows (beams, samples), its log entry follows."""
        self.log[-1].exit_layer = self.log[-1].exit_layer.index_select(0, index)

    def flush(self) -> None:
        """Catch-up only: run every pending token through the layers (and exits) it skipped, so that the caches
        equal a full-depth forward's. Generation does not need it; handing over the cache does. Exit K/V that closed
        gates left owed are written too."""
        self.fill_owed_exits()
        if not self.pending:
            return
        x, span = None, None
        for lo, hi in self.segments():
            if lo >= self.pending[-1].depth:
                x, span = self._join_pending(lo, x, span)
                x = self.run_segment(lo, hi, x, span)[0]
        self.pending = []

    # ----------------------------------------------------------------------------------------------------------
    def _prepare(self, span: Span) -> Span:
        span = self.kernel.prepare(span, self.tables)
        bias = self.cache.encoder_bias
        if bias is not None:
            span.cross_bias = bias if span.rows is None else bias[span.rows]
        return span

    def span(self, rows: torch.Tensor | None, cols: torch.Tensor) -> Span:
        """A span of tokens at per-row columns `cols` (R, q) for batch `rows` (None: all), positions included."""
        base = self._base if rows is None else self._base[rows]
        return self._prepare(make_span(self.cache, cols.shape[1], base + cols, cols=cols, rows=rows))

    def aligned_span(self, rows: torch.Tensor | None, start: int, q: int) -> Span:
        """A span at the same columns start..start+q-1 for every row of `rows` (the fast path)."""
        base = self._base if rows is None else self._base[rows]
        cols = torch.arange(start, start + q, device=base.device)[None]
        return self._prepare(make_span(self.cache, q, base + cols, start=start, rows=rows))

    def _group_span(self, start: int, q: int) -> Span:
        cols = torch.arange(start, start + q, device=self._base.device)[None]
        return self._prepare(make_span(self.cache, q, self._base + cols, start=start))

    def _cross(self, keys, values, index: int, span: Span):
        if keys is None:
            return None
        if span.rows is None:
            return keys[index], values[index], span.cross_bias
        return keys[index][span.rows], values[index][span.rows], span.cross_bias

    def run_layer(self, layer: int, x: torch.Tensor, span: Span) -> torch.Tensor:
        c = self.cache
        if self.calls is not None:
            self.calls.append(("layer", layer, x.shape[1]))
        cross = self._cross(c.cross_keys, c.cross_values, layer - 1, span)
        return self.kernel.layer(self.kernel.layers[layer - 1], x, c.keys[layer - 1], c.values[layer - 1], span, cross)

    def run_exit(self, ex: ExitKernel, x: torch.Tensor, span: Span) -> torch.Tensor:
        c = self.cache
        if ex.slot in self.exit_owed:  # earlier tokens' K/V, owed by closed gates: attention is about to read them
            self._fill_owed(ex)
        if self.calls is not None:
            self.calls.append(("exit", self.exit_list[ex.slot], x.shape[1]))
        cross = self._cross(c.exit_cross_keys, c.exit_cross_values, ex.slot, span)
        return self.kernel.layer(ex.layer, x, c.exit_keys[ex.slot], c.exit_values[ex.slot], span, cross)

    def _new_outputs(self, b: int, like: torch.Tensor):
        out = torch.empty(b, self.lm.vocab_size, dtype=like.dtype, device=like.device)
        exit_layer = torch.full((b,), self.n, dtype=torch.long, device=like.device)
        crit_state = self.criterion.new_step(b, like.device) if self.checking else None
        return out, exit_layer, crit_state

    # ----------------------------------------------------------------------------------------------------------
    def segments(self) -> list[tuple[int, int]]:
        """The unit of work: a segment (lo, hi] is layers lo+1..hi, then the exit at hi if there is one. A step is
        its segments in turn, cut at the exits this engine runs (checked ones, or speculative decoding's drafting one),
        with an exit decision between two."""
        bounds = [0, *self.exit_list, self.n]
        return list(zip(bounds[:-1], bounds[1:]))

    def run_segment(self, lo: int, hi: int, x: torch.Tensor, span: Span, exit: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Segment (lo, hi] over x (R, q, D) at `span`: (h_hi, the last layer's input, the exit's output state). The
        exit transformer runs when `exit` and the exit at hi has one (else the state is h_hi)."""
        prev = x
        for layer in range(lo + 1, hi + 1):
            prev = x
            x = self.run_layer(layer, x, span)
        ex = self.exit_at.get(hi) if exit else None
        state = self.run_exit(ex, x, span) if ex is not None and ex.uses_cache else x
        return x, prev, state

    def _join_pending(self, depth: int, x: torch.Tensor, span: Span) -> tuple[torch.Tensor, Span]:
        """Catch-up: tokens left after layer `depth` (always a segment's start: they stopped at an exit) join the
        group that goes on from there, in column order before it."""
        joiners = [p for p in self.pending if p.depth == depth]
        if not joiners:
            return x, span
        if x is not None:
            joiners = [*joiners, _Pending(depth, span.start, x)]
        x = torch.cat([p.hidden for p in joiners], 1)
        return x, self._group_span(joiners[0].col, x.shape[1])

    def _at_column(self, rows: torch.Tensor, col: int):
        """(cols, RoPE (cos, sin) or None) of one token per row of `rows`, all at column `col` (a decode step)."""
        cols = torch.full((rows.shape[0],), col, dtype=torch.long, device=rows.device)
        if not self.kernel.has_rope:
            return cols, None
        cos, sin = self.kernel.rope(self._base[rows] + col, self.tables)
        return cols, (cos[:, -1], sin[:, -1])

    def _step(self, x: torch.Tensor | None, span: Span | None, *, prefill: bool = False, static=None
              ) -> torch.Tensor:
        """One step: the prompt (`prefill`), or one token per row at column `cache.length`; next-token logits (B, V).

        The step runs the segments in turn (`run_segment`, or `static.run`: the same segments over static buffers,
        graphed on CUDA) and, when exits decide, asks the criterion after each exit about the rows still deciding;
        the decision comes to the host in one transfer. Rows that leave are carried in one of two ways:
        - ride along (the prefill, catch-up, the static step): every row runs every segment that runs (the batch keeps
          its shape; the prefill and catch-up's tokens need exact K/V, the static step's graphs fixed shapes); the step
          stops when no row is left deciding (catch-up: its tokens wait as pending for the next token going deep);
        - narrow (propagate / copy, eager): the remaining rows run on as a smaller batch, gates are asked before the
          exit runs (a closed gate costs the gate; the exit's K/V are owed).
        Rows that leave a decode step outside catch-up get the skip policy's fill for their skipped slots."""
        ride = prefill or static is not None or self.policy.batch_moves_together
        fill = not prefill and not self.policy.batch_moves_together
        gated, checking, kernel, sub = self.gated, self.checking, self.kernel, self.head_subset
        like = self.cache.keys if x is None else x
        b = like.shape[1] if x is None else x.shape[0]
        out, exit_layer, crit_state = self._new_outputs(b, like) if checking else (None, None, None)
        rows = self._rows  # the batch rows the step's tensors hold (narrow: fewer as rows leave)
        active = list(range(b))  # positions in the step's tensors of the rows still deciding
        last = self._prefill_last if prefill else None
        col = self.cache.length
        events: list[ExitEvent] = []
        gate_log: list = []
        blocks: dict[int, int] = {}
        exit_blocks: dict[int, int] = {}
        stop = self.n
        for i, (lo, hi) in enumerate(self.segments()):
            ex = self.exit_at.get(hi)
            late_exit = gated and not ride and ex is not None  # the gate decides first whether the exit runs
            if static is not None:
                seg = static.run(i)
                xs, x_t, prev_t, state_t, seg_logits = seg.x, seg.x[:, -1], seg.prev, seg.state, seg.logits
            else:
                if ride and not prefill:
                    x, span = self._join_pending(lo, x, span)
                x, prev, state = self.run_segment(lo, hi, x, span, exit=not late_exit)
                if ride:
                    q = x.shape[1]
                    blocks[q] = blocks.get(q, 0) + hi - lo
                    if ex is not None and ex.uses_cache:
                        exit_blocks[q] = exit_blocks.get(q, 0) + 1
                if last is None:
                    x_t, prev_t, state_t = x[:, -1], prev[:, -1], state[:, -1]
                else:  # a prompt row whose last real position is not its last column
                    ar = torch.arange(b, device=x.device)
                    x_t, prev_t, state_t = x[ar, last], prev[ar, last], state[ar, last]
                xs, seg_logits = x, None
            if ex is None:  # the final layer: rows still deciding take the model's head
                if not checking:
                    out = kernel.logits(x_t) if seg_logits is None else seg_logits
                elif len(active) == len(rows):
                    logits = (kernel.logits(x_t) if seg_logits is None else seg_logits).to(out.dtype)
                    if len(rows) == b:
                        out = logits
                    else:
                        out[rows] = logits
                elif active:  # riding along: only the rows still deciding
                    a_idx = _index(active, like.device)
                    picked = kernel.logits(x_t[a_idx]) if seg_logits is None else seg_logits[a_idx]
                    out[rows[a_idx]] = picked.to(out.dtype)
                break
            if not checking or not active:
                continue
            asked = active  # positions asked this time
            if gated:  # a gate on h_i first; only rows where it opens are checked
                asked_idx = _index(asked, like.device)
                opened = self.criterion.open(hi, x_t[asked_idx])
                gate_log.append((hi, rows[asked_idx], opened))
                flags = opened.tolist()
                closed = [p for p, o in zip(asked, flags) if not o]
                asked = [p for p, o in zip(asked, flags) if o]
                if late_exit and ex.uses_cache and closed:  # their exit K/V: projected from h_i, now or owed
                    c_idx = _index(closed, like.device)
                    cols, rope = self._at_column(rows[c_idx], col)
                    owed = (rows[c_idx], cols, x_t[c_idx], rope)
                    if self.lazy_exit_fill:
                        self.exit_owed.setdefault(ex.slot, []).append(owed)
                    else:
                        fill_exit_kv(self, ex, owed[2], owed[0], owed[1], owed[3])
                if not asked:
                    continue
            a_idx = None if len(asked) == len(rows) else _index(asked, like.device)
            x_a, prev_a = _pick(x_t, a_idx), _pick(prev_t, a_idx)
            if late_exit and ex.uses_cache:  # the exit runs for the rows whose gate opened
                a_span = span if a_idx is None else span.select(a_idx)
                state_a = self.run_exit(ex, _pick(xs, a_idx), a_span)[:, -1]
            else:
                state_a = _pick(state_t, a_idx)
            if seg_logits is not None:
                logits_a = _pick(seg_logits, a_idx)
            else:
                logits_a = ex.logits(kernel, state_a, sub) if self.criterion.needs_logits else None
            go = self.criterion(crit_state, rows if a_idx is None else rows[a_idx], logits_a, x_a, prev_a)
            flags = go.tolist()  # the decision's one host transfer
            leave = [j for j, g in enumerate(flags) if g]  # indices into `asked`
            if not leave:
                continue
            l_idx = _index(leave, like.device)
            leaving = [asked[j] for j in leave]  # positions in the step's tensors
            p_idx = _index(leaving, like.device)
            chosen = logits_a[l_idx] if logits_a is not None else ex.logits(kernel, state_a[l_idx], sub)
            out[rows[p_idx]] = (chosen if sub is None else sub.scatter(chosen)).to(out.dtype)
            exit_layer[rows[p_idx]] = hi
            if fill:
                source = state_a if self.policy.source == "exit" else x_a
                event_rows = rows[p_idx]
                events.append(ExitEvent(event_rows, hi, ex.slot, source[l_idx],
                                        *self._at_column(event_rows, col)))
            gone = set(leaving)
            active = [p for p in active if p not in gone]
            if ride:
                if not active and not prefill:
                    stop = hi
                    break
                continue
            if not active:  # narrow: the rows still deciding run on
                break
            k_idx = _index(active, like.device)
            x, span, rows = x[k_idx], span.select(k_idx), rows[k_idx]
            active = list(range(len(active)))
        for event in events:
            fill_skipped(self, event)
        if not prefill and self.policy.batch_moves_together:
            if stop < self.n:  # the group waits after `stop` for the next token that goes deep
                kept = [p for p in self.pending if p.depth >= stop]
                start = span.start
                self.pending = kept + [_Pending(stop, start + i, x[:, i : i + 1]) for i in range(x.shape[1])]
            else:
                self.pending = []
        if exit_layer is None:
            exit_layer = self._full_exit_layer(b, like.device)
        together = (blocks, exit_blocks) if ride and static is None else None
        self.log.append(_StepLog(exit_layer, prefill, together, gate_log or None, self._filled_rows or None))
        self._filled_rows = []
        return out

    def _fill_owed(self, ex: ExitKernel) -> None:
        """Project every K/V pair exit `ex` owes (closed gates since it last ran) in one batched call."""
        owed = self.exit_owed.pop(ex.slot)
        rows = torch.cat([o[0] for o in owed])
        rope = None if owed[0][3] is None else tuple(torch.cat([o[3][i] for o in owed]) for i in range(2))
        fill_exit_kv(self, ex, torch.cat([o[2] for o in owed]), rows, torch.cat([o[1] for o in owed]), rope)
        self._filled_rows.append(rows)

    def fill_owed_exits(self) -> None:
        """Write every exit K/V closed gates left owed (lazy filling), e.g. before the cache is handed over."""
        for layer in self.exit_list:
            ex = self.exit_at[layer]
            if ex.slot in self.exit_owed:
                self._fill_owed(ex)

    def _full_exit_layer(self, b: int, device) -> torch.Tensor:
        if getattr(self, "_full", None) is None or self._full.shape[0] != b:
            self._full = torch.full((b,), self.n, dtype=torch.long, device=device)
        return self._full

    def work(self) -> WorkLog:
        """What this call ran, as statistics the result keeps (the engine and its buffers are not kept)."""
        return WorkLog(
            self.log, self.n, list(self.exit_list), self.checking, self.checking and self.criterion.needs_logits,
            self.head_subset, self.uses_exit_cache, self.lazy_exit_fill, self.policy.name,
            static=self._static_step is not None or self.static_rounds is not None,
            graphed=any(s is not None and s.capture for s in (self._static_step, self.static_rounds)),
            pending=len(self.pending),
            owed_exit_kv=sum(o[0].numel() for group in self.exit_owed.values() for o in group))
