"""The decoding loops on the lean engine: greedy, sampling and beam search, batched and left-padded.

gpt-fast-style: `prefill`, then one `Engine.step` per token, in a plain Python loop; no transformers `generate`
around it (its per-step machinery costs more than a layer of a small LM). The loops reproduce transformers'
semantics so that with exits off the tokens are the VLM's own `generate`'s: greedy = argmax of the float32 logits,
finished rows fed the pad token; sampling through transformers' own logits warpers (temperature, top-k, top-p) and
`torch.multinomial`; beam search as transformers' vectorised beam search (2·num_beams candidates per step, length
penalty on finished hypotheses, `early_stopping` False / True / "never", EOS handling), written out here because
transformers' implementation is a private method of `GenerationMixin` that drives a model's `forward`.

`generate_from_inputs` is the entry point: prepared LM inputs in, a `GenerationResult` out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from functools import cached_property

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from freevlm.errors import FreeVLMError
from freevlm.generation.bounds import check_generation_bounds
from freevlm.generation.buffers import Buffers
from freevlm.generation.cache import KVCache
from freevlm.generation.engine import Engine, StepRecord, WorkLog
from freevlm.generation.kv import SkipPolicy
from freevlm.generation.session import DecodeSession, bucket_columns, decode_key
from freevlm.generation.speculative import (
    DraftSettings,
    SpeculativeStats,
    speculative_decode,
)


@dataclass
class DecodeSettings:
    """transformers-named generation settings this engine implements (anything else is refused, not ignored)."""

    max_new_tokens: int = 30
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50  # transformers' default when sampling (0 or None: off)
    top_p: float | None = None
    num_return_sequences: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    min_new_tokens: int = 0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    output_logits: bool = False
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int = 0

    @classmethod
    def from_kwargs(cls, generation_config, lm_config, **kwargs) -> DecodeSettings:
        """The model's generation defaults (eos/pad, length penalty, ...) overridden by `kwargs`."""
        names = set(cls.__dataclass_fields__)
        ignored = {"return_dict_in_generate", "use_cache"}
        unknown = sorted(k for k in kwargs if k not in names and k not in ignored)
        if unknown:
            raise FreeVLMError(f"generation setting(s) {', '.join(unknown)} are not supported by freevlm's engine "
                               f"(supported: {', '.join(sorted(names))})")
        base = {}
        for name in ("length_penalty", "early_stopping", "no_repeat_ngram_size", "repetition_penalty",
                     "temperature", "top_k", "top_p"):
            value = getattr(generation_config, name, None) if generation_config is not None else None
            if value is not None:
                base[name] = value
        eos = kwargs.pop("eos_token_id", None)
        if eos is None:
            eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
        if eos is None:
            eos = lm_config.eos_token_id
        pad = kwargs.pop("pad_token_id", None)
        if pad is None:
            pad = getattr(generation_config, "pad_token_id", None) if generation_config is not None else None
        if pad is None:
            pad = lm_config.pad_token_id
        eos_list = [] if eos is None else ([int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)])
        if pad is None:
            pad = eos_list[0] if eos_list else 0
        s = cls(**{**base, **{k: v for k, v in kwargs.items() if k in names}}, eos_token_id=eos_list,
                pad_token_id=int(pad))
        if s.max_new_tokens < 1:
            raise FreeVLMError(f"max_new_tokens must be >= 1, got {s.max_new_tokens}")
        if s.num_beams < 1:
            raise FreeVLMError(f"num_beams must be >= 1, got {s.num_beams}")
        if s.num_return_sequences < 1 or (s.num_beams > 1 and s.num_return_sequences > s.num_beams):
            raise FreeVLMError(f"num_return_sequences must lie in 1..num_beams, got {s.num_return_sequences}")
        return s

    def processors(self, beams: bool) -> LogitsProcessorList:
        """transformers' own processors and warpers, in the order `generate` applies them."""
        procs = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.no_repeat_ngram_size:
            procs.append(NoRepeatNGramLogitsProcessor(self.no_repeat_ngram_size))
        if self.do_sample:
            keep = 2 if beams else 1
            if self.temperature != 1.0:
                procs.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k:
                procs.append(TopKLogitsWarper(self.top_k, min_tokens_to_keep=keep))
            if self.top_p is not None and self.top_p < 1.0:
                procs.append(TopPLogitsWarper(self.top_p, min_tokens_to_keep=keep))
        return procs


@dataclass
class GenerationResult:
    """What generation produced, token by token, and what it cost. It holds statistics, not the engine: the engine's
    buffers (KV cache, static steps, CUDA graphs) go back to the decode session for the next call, so a result kept
    around holds no device memory beyond its tensors, unless the cache was asked for (`keep_cache=True`)."""

    sequences: torch.Tensor  # (R, T) generated token ids, prompt removed, padded with pad_token_id after EOS
    texts: list[str]  # decoded sequences (empty strings when no tokenizer was given)
    exit_layers: list[list[int]]  # per sequence, the layer each generated token left at (N = final layer)
    trace: list[list[tuple[int, int]]]  # per sequence, the (step, batch row) that produced each token
    num_layers: int  # N, the LM's depth
    seconds: float  # wall-clock time of the generate call (decoding; not the completion of a kept cache)
    live_rows: list[torch.Tensor]  # per step, rows whose output was still used (unfinished sequences / beams)
    work: WorkLog  # what the engine ran, per step (`records` reads it as work counts)
    logits: tuple[torch.Tensor, ...] | None = None  # per step (rows, V), when asked for with output_logits=True
    speculative: SpeculativeStats | None = None  # speculative mode: acceptance, tokens per verification, ...
    calls: list[tuple[str, int, int]] | None = None  # trace=True: every kernel call (kind, 1-based layer, tokens)
    cache: KVCache | None = None  # keep_cache=True: the KV cache after generation (see `caches`)

    @cached_property
    def records(self) -> list[StepRecord]:
        """Per step, per row: what the engine ran (step 0 is the prompt's prefill)."""
        return self.work.records()

    @property
    def log(self) -> list:
        """The engine's step log (speculative rounds: drafts, tokens and live rows per round)."""
        return self.work.entries

    def caches(self) -> KVCache:
        """The KV cache after generation, complete: under catch-up the tokens still waiting for their deeper layers
        were run when generation ended (`Engine.flush`), as were exit K/V closed gates still owed. Kept only when
        asked for: a cache is the call's largest allocation, and without it the session reuses it."""
        if self.cache is None:
            raise FreeVLMError("the KV cache was not kept: pass keep_cache=True to generate")
        return self.cache

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.trace)


def _cut(row: list[int], eos: set[int]) -> int:
    """Length of a generated row up to and including its first EOS."""
    for i, t in enumerate(row):
        if t in eos:
            return i + 1
    return len(row)


def _greedy_or_sample(engine: Engine, logits: torch.Tensor, s: DecodeSettings, prompt_ids: torch.Tensor | None,
                      logits_out: list | None):
    """Returns the generated ids (R, T) padded with pad_token_id, and each row's length."""
    rows = logits.shape[0]
    device = logits.device
    procs = s.processors(beams=False)
    eos = torch.tensor(s.eos_token_id, device=device, dtype=torch.long)
    out = torch.full((rows, s.max_new_tokens), s.pad_token_id, dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    steps = 0
    for t in range(s.max_new_tokens):
        scores = logits.float()
        if logits_out is not None:  # a copy where `float()` was none: a static step's output is overwritten next step
            logits_out.append(scores.clone() if scores is logits else scores)
        if t < s.min_new_tokens and eos.numel():
            scores = scores.clone()
            scores[:, eos] = float("-inf")
        if len(procs):
            ids = out[:, :t] if prompt_ids is None else torch.cat([prompt_ids, out[:, :t]], 1)
            scores = procs(ids, scores)
        if s.do_sample:
            nxt = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)[:, 0]
        else:
            nxt = scores.argmax(dim=-1)
        if t:  # rows that already finished are fed (and emit) padding, as transformers does
            nxt = torch.where(done, s.pad_token_id, nxt)
        out[:, t] = nxt
        steps = t + 1
        if eos.numel():
            done = done | torch.isin(nxt, eos)
            if bool(done.all()):
                break
        if t + 1 < s.max_new_tokens:
            logits = engine.step(nxt)
    out = out[:, :steps]
    eos_set = set(s.eos_token_id)
    lengths = [_cut(row, eos_set) for row in out.tolist()]
    return out, lengths


def _beam_search(engine: Engine, logits: torch.Tensor, s: DecodeSettings, batch: int,
                 prompt_ids: torch.Tensor | None, logits_out: list | None):
    """transformers' vectorised beam search over the engine. Returns (sequences (batch*nret, T), beam indices
    (batch*nret, T) = the engine row that produced each token (-1 past the end))."""
    nb, vocab, max_new = s.num_beams, logits.shape[-1], s.max_new_tokens
    device = logits.device
    procs = s.processors(beams=True)
    eos = torch.tensor(s.eos_token_id, device=device, dtype=torch.long)
    keep = max(2, 1 + eos.numel()) * nb
    top_nb = torch.cat([torch.ones(nb, dtype=torch.bool), torch.zeros(keep - nb, dtype=torch.bool)]).to(device)
    running = torch.full((batch, nb, max_new), s.pad_token_id, dtype=torch.long, device=device)
    finished = running.clone()
    running_scores = torch.zeros((batch, nb), device=device)
    running_scores[:, 1:] = -1e9
    finished_scores = torch.full((batch, nb), -1e9, device=device)
    is_finished = torch.zeros((batch, nb), dtype=torch.bool, device=device)
    improvable = torch.ones((batch, 1), dtype=torch.bool, device=device)
    running_idx = torch.full((batch, nb, max_new), -1, dtype=torch.long, device=device)
    finished_idx = running_idx.clone()
    offset = (torch.arange(batch, device=device) * nb)[:, None]

    def gather(t, idx):
        while idx.dim() < t.dim():
            idx = idx.unsqueeze(-1)
        return torch.take_along_dim(t, idx, dim=1)

    for t in range(max_new):
        scores = logits.float()
        if logits_out is not None:
            logits_out.append(scores.clone() if scores is logits else scores)
        log_probs = torch.log_softmax(scores, dim=-1)
        if t < s.min_new_tokens and eos.numel():
            log_probs[:, eos] = float("-inf")
        if len(procs):
            flat = running[:, :, :t].reshape(batch * nb, t)
            ids = flat if prompt_ids is None else torch.cat([prompt_ids, flat], 1)
            log_probs = procs(ids, log_probs)
        acc = (log_probs.view(batch, nb, vocab) + running_scores[:, :, None]).view(batch, nb * vocab)
        if s.do_sample:
            top_i = torch.multinomial(torch.softmax(acc, dim=-1), num_samples=keep)
            top_lp = torch.gather(acc, 1, top_i)
        else:
            top_lp, top_i = torch.topk(acc, k=keep)
        beam = top_i // vocab
        tok = top_i % vocab
        top_seqs = gather(running, beam)
        top_seqs[:, :, t] = tok
        top_idx = gather(running_idx, beam)
        top_idx[:, :, t] = beam + offset
        hits = torch.isin(tok, eos) if eos.numel() else torch.zeros_like(tok, dtype=torch.bool)
        if t + 1 >= max_new:
            hits = torch.ones_like(hits)
        # running beams for the next step: the best candidates that did not stop
        run_lp = top_lp + hits.float() * -1e9
        nxt = torch.topk(run_lp, k=nb)[1]
        running, running_scores, running_idx = gather(top_seqs, nxt), gather(run_lp, nxt), gather(top_idx, nxt)
        # finished hypotheses: merge the candidates among the top num_beams that just stopped
        just = hits & top_nb[None, :]
        fin_lp = top_lp / ((t + 1) ** s.length_penalty)
        full = is_finished.all(-1, keepdim=True) & (s.early_stopping is True)
        fin_lp = fin_lp + full.float() * -1e9 + (~improvable).float() * -1e9 + (~just).float() * -1e9
        m_seqs = torch.cat([finished, top_seqs], 1)
        m_scores = torch.cat([finished_scores, fin_lp], 1)
        m_idx = torch.cat([finished_idx, top_idx], 1)
        m_done = torch.cat([is_finished, just], 1)
        best = torch.topk(m_scores, k=nb)[1]
        finished, finished_scores = gather(m_seqs, best), gather(m_scores, best)
        finished_idx, is_finished = gather(m_idx, best), gather(m_done, best)
        # stop when no running beam can beat the finished ones (transformers' heuristic), or nothing can continue
        if s.early_stopping == "never" and s.length_penalty > 0.0:
            best_len = max_new
        else:
            best_len = t + 1
        best_running = running_scores[:, :1] / (best_len**s.length_penalty)
        worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True)[0], -1.0e9)
        improvable = improvable & (best_running > worst_finished).any(-1, keepdim=True)
        open_beam = not (bool(is_finished.all()) and s.early_stopping is True)
        if not (bool(improvable.any()) and open_beam and not bool(hits.all())):
            break
        engine.reorder(running_idx[:, :, t].reshape(-1))
        logits = engine.step(running[:, :, t].reshape(-1))
    nret = s.num_return_sequences
    seqs = finished[:, :nret].reshape(batch * nret, max_new)
    idx = finished_idx[:, :nret].reshape(batch * nret, max_new)
    length = int((idx >= 0).sum(1).max())
    return seqs[:, :length], idx[:, :length]


@torch.no_grad()
def generate_from_inputs(
    lm, exits, lm_inputs, *, criterion=None, policy: SkipPolicy | None = None, tokenizer=None,
    generation_config=None, draft: DraftSettings | None = None, trace: bool = False, static: bool | None = None,
    check_layers: list[int] | None = None, max_cache_gb: float | None = None, head_subset=None,
    lazy_exit_fill: bool = True, keep_cache: bool = False, session: DecodeSession | None = None, **generate_kwargs,
) -> GenerationResult:
    """Generation from prepared LM inputs (see `VLMBackbone.prepare`).

    `generate_kwargs` are transformers-named settings (see `DecodeSettings`: max_new_tokens, num_beams, do_sample,
    top_p, length_penalty, num_return_sequences, ...); `generation_config` supplies the model's defaults (its EOS and
    pad ids). Modes: with `criterion` and exits, early exit; with `draft`, lossless speculative decoding drafted by
    the exit at `draft.layer`; otherwise full depth. `static`: static-shape decode steps (CUDA graphs on a GPU;
    default: on CUDA only; see `graphs.py`). `max_cache_gb`: the static cache's memory budget (default: the memory
    available on the device); the call is refused up front past it or past the LM's positions (`bounds.py`).
    `head_subset` (a `HeadSubset`, `vocab.py`): exit checks and drafts score only its token ids (speculative
    verification keeps the full head). `lazy_exit_fill`: closed gates' exit K/V are projected when the exit next
    runs (False: at once; see `Engine`). `keep_cache`: the result keeps the KV cache (`GenerationResult.caches`),
    completed first (catch-up's pending layers, owed exit K/V); otherwise it is dropped (or reused by a session).
    `session` (a `DecodeSession`, `session.py`): the cache and the static steps (their CUDA graphs) come from it and
    stay in it for the next call of the same shape and signature; without one they are this call's own.
    """
    start = time.perf_counter()
    s = DecodeSettings.from_kwargs(generation_config, lm.config, **generate_kwargs)
    if draft is not None:
        if head_subset is not None:
            draft = replace(draft, head_subset=head_subset)
        engine = Engine(lm, exits, policy=policy, trace=trace, draft_layer=draft.layer, static=False)
    else:
        engine = Engine(lm, exits, criterion, policy, trace=trace, static=static, check_layers=check_layers,
                        head_subset=head_subset, lazy_exit_fill=lazy_exit_fill)
    embeds = lm_inputs.inputs_embeds
    extra_columns = draft.max_draft + 1 if draft else 0
    expand = s.num_beams if s.num_beams > 1 else s.num_return_sequences
    static = static if static is not None else embeds.device.type == "cuda"
    if draft is not None:  # greedy rounds are graphed (`graphs.StaticSpeculative`), sampling rounds run eagerly
        static = static and not s.do_sample and engine.kernel.static_rope
    columns = (1 if lm.is_encoder_decoder else embeds.shape[1]) + s.max_new_tokens + extra_columns
    check_generation_bounds(engine, lm_inputs, s.max_new_tokens, extra_columns, expand, max_cache_gb, memory=False)
    key = None
    if session is not None:
        key, pins = decode_key(engine, lm_inputs, expand, bucket_columns(columns), static, draft, s.eos_token_id)
        buffers, reused = session.buffers(key, bucket_columns(columns), pins)
    else:
        buffers, reused = Buffers(columns), False
    try:
        if not reused:  # a reused entry's memory is already allocated
            try:
                check_generation_bounds(engine, lm_inputs, s.max_new_tokens, extra_columns, expand, max_cache_gb,
                                        positions=False, columns=buffers.max_len)
            except FreeVLMError:
                if session is None or not session.evict_others(key):
                    raise
                check_generation_bounds(engine, lm_inputs, s.max_new_tokens, extra_columns, expand, max_cache_gb,
                                        positions=False, columns=buffers.max_len)
        result = _decode(engine, buffers, lm, lm_inputs, s, draft, static, expand, extra_columns, tokenizer,
                         keep_cache, start)
    except BaseException:
        if session is not None:  # a call that failed midway (a capture included) leaves nothing to reuse
            session.drop(key)
        raise
    finally:
        buffers.release()
    if keep_cache and session is not None:
        session.drop(key)  # the cache is the result's now
    return result


def _exit_layers_by_step(log) -> list[list[int]]:
    """Each step's exit layer per row, brought to the host in one transfer (one sync, not one per step)."""
    if not log:
        return []
    layers = [entry.exit_layer for entry in log]
    if all(t.shape == layers[0].shape for t in layers):
        return torch.stack(layers).tolist()
    return [t.tolist() for t in layers]


def _decode(engine: Engine, buffers: Buffers, lm, lm_inputs, s: DecodeSettings, draft: DraftSettings | None,
            static: bool, expand: int, extra_columns: int, tokenizer, keep_cache: bool, start: float
            ) -> GenerationResult:
    """`generate_from_inputs` once the engine and its buffers are chosen: prefill, decode, the result."""
    batch = lm_inputs.inputs_embeds.shape[0]
    logits = engine.prefill(lm_inputs, s.max_new_tokens, extra_columns=extra_columns, buffers=buffers)
    if not lm.is_encoder_decoder:
        prompt_ids = lm_inputs.input_ids
    else:
        prompt_ids = torch.full((batch, 1), lm.config.decoder_start_token_id, dtype=torch.long,
                                device=logits.device)
    if expand > 1:
        index = torch.arange(batch, device=logits.device).repeat_interleave(expand)
        engine.reorder(index)
        engine.expand_log(index)
        logits = logits.index_select(0, index)
        prompt_ids = prompt_ids.index_select(0, index)
    logits_out = [] if s.output_logits else None
    stats = None
    if draft is not None:
        if s.output_logits:
            raise FreeVLMError("output_logits is not available in speculative mode (tokens come in blocks)")
        stats = SpeculativeStats()
        sequences, lengths = speculative_decode(engine, logits, s, draft, stats,
                                                capture=static and logits.device.type == "cuda")
        traces = [[(t, r) for t in range(n)] for r, n in enumerate(lengths)]
        rows = torch.arange(sequences.shape[0])
        live = [rows] + [entry.live for entry in engine.log[1:]]
        exit_layers = [[lm.num_layers] * n for n in lengths]  # every token is the full model's
    else:
        if s.num_beams > 1:
            sequences, beam_idx = _beam_search(engine, logits, s, batch, prompt_ids, logits_out)
            traces = [[(t, row) for t, row in enumerate(r) if row >= 0] for r in beam_idx.tolist()]
            live = [torch.arange(batch * s.num_beams) for _ in range(len(engine.log))]
        else:
            sequences, lengths = _greedy_or_sample(engine, logits, s, prompt_ids, logits_out)
            traces = [[(t, r) for t in range(n)] for r, n in enumerate(lengths)]
            live = [torch.tensor([r for r, n in enumerate(lengths) if n > t], dtype=torch.long)
                    for t in range(len(engine.log))]
        exit_by_step = _exit_layers_by_step(engine.log)
        exit_layers = [[exit_by_step[t][row] for t, row in tr] for tr in traces]
    texts = [""] * len(traces)
    if tokenizer is not None:
        ids = sequences.tolist()
        texts = [tokenizer.decode(ids[i][: len(tr)], skip_special_tokens=True).strip() for i, tr in enumerate(traces)]
    seconds = time.perf_counter() - start
    work = engine.work()
    calls = None if engine.calls is None else list(engine.calls)  # the decode's calls (not the completion's below)
    cache = None
    if keep_cache:
        engine.flush()
        cache = engine.cache
    return GenerationResult(sequences, texts, exit_layers, traces, lm.num_layers, seconds, live, work,
                            tuple(logits_out) if logits_out is not None else None, stats, calls, cache)
