"""The one thread that owns the model: continuous batching between decode steps.

Requests wait in a FIFO queue. Each tick the scheduler admits what fits, steps every running batch by one token, hands
each request its new text, and frees the rows of requests that finished or whose client went away.

Which requests batch at step level (docs/serving.md): greedy requests (temperature 0) on a decoder-only LM in mode
`full`, or `early_exit` under the propagate / copy KV policies without gates. They decode in a `RowBatch`
(`session.py`) per decoding signature (mode, threshold): a request is prefilled into a free row between two steps
and leaves when done, and it gets the tokens it gets alone (`EarlyExitVLM.generate`). Every other request (sampling,
`speculative`, the catch_up policy, gates, encoder-decoder LMs) is decoded alone by `EarlyExitVLM.generate`, on this
thread between two steps of the running batches, which wait for it; one such request per tick, so they cannot
starve the batches.

A batch's KV cache has `max_columns` columns and every row writes the same column each step, so columns are used up
as the batch runs: a request is admitted only where its prompt and max_tokens still fit; otherwise the batch stops
admitting, drains, and is closed; the next request opens a fresh one (its buffers reused from the session). A batch
has as many rows as requests of its signature were waiting when it opened (a power of two, up to `max_batch_size`:
every row costs compute each step, occupied or not); one that more requests outgrow drains and reopens larger.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch

from freevlm.backbones.base import LMInputs
from freevlm.errors import FreeVLMError
from freevlm.generation.api import DecodeOptions, EarlyExitVLM
from freevlm.generation.decode import DecodeSettings
from freevlm.generation.session import DecodeSession, RowBatch
from freevlm.serve.config import ServeConfig
from freevlm.serve.metrics import Metrics
from freevlm.serve.protocol import ChatRequest, RequestError, TextStream, usage

log = logging.getLogger("freevlm.serve")

MAX_LANES = 4  # running batches with different decoding signatures at once (each holds a KV cache)
SHUTTING_DOWN = "the server is shutting down"


def steps_in_batch(vlm: EarlyExitVLM, options: DecodeOptions, sampling: bool) -> bool:
    """Whether a request decodes at step level in a shared batch (else alone, between steps). Gated exits (a plan's
    gates) decode alone: a closed gate leaves exit K/V owed to its row's columns, to be written later, and a row
    released and reused in between would receive them."""
    return (not sampling and options.mode in ("full", "early_exit") and options.num_beams == 1
            and not vlm.backbone.lm.is_encoder_decoder
            and (options.mode == "full" or (options.kv_policy in ("propagate", "copy") and options.gates is None)))


@dataclass
class Job:
    """A request in flight: its decoding, its text so far, and where its events go (`deliver`, called on the
    scheduler thread: ("delta", text), ("done", finish_reason, usage, extension), ("error", RequestError))."""

    request: ChatRequest
    options: DecodeOptions  # the operator's, with the request's mode and threshold
    batched: bool  # decoded at step level in a shared batch
    deliver: Callable[[tuple], None]
    cancelled: threading.Event = field(default_factory=threading.Event)  # the client went away
    text: TextStream | None = None
    exit_layers: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    lm_inputs: object = None  # prepared once, kept while the job waits for room
    seed: int | None = None
    speculative: dict | None = None
    key: str = ""  # the decoding signature (`signature`): which batch the job decodes in
    prompt_fits: bool | None = None  # the prompt is within max_prompt_tokens (None: not counted yet)

    def cancel(self) -> None:
        self.cancelled.set()

    def extension(self) -> dict:
        """The response's `freevlm` field: how the request was decoded."""
        out = {"mode": self.options.mode, "batched": self.batched, "exit_layers": self.exit_layers}
        if self.options.mode == "early_exit":
            out["threshold"] = self.options.threshold
        if self.seed is not None:
            out["seed"] = self.seed
        if self.speculative is not None:
            out["speculative"] = self.speculative
        return out


@dataclass
class Lane:
    """A running batch of one decoding signature: its rows and the jobs in them."""

    batch: RowBatch
    jobs: dict[int, Job] = field(default_factory=dict)  # row -> job
    draining: bool = False  # a waiting request did not fit: admit nothing more, so the batch empties and restarts


def signature(options: DecodeOptions) -> str:
    """What a batch's rows share: every decoding setting but the token budget (each row has its own)."""
    return json.dumps(asdict(replace(options, max_new_tokens=0)), sort_keys=True, default=str)


class Scheduler:
    """Owns the model on its own thread (`start`, `stop`); `submit` queues a job from any thread."""

    def __init__(self, vlm: EarlyExitVLM, cfg: ServeConfig, metrics: Metrics):
        self.vlm, self.cfg, self.metrics = vlm, cfg, metrics
        lm = vlm.backbone.lm
        self.tokenizer = vlm.backbone.processor.tokenizer
        self.eos = DecodeSettings.from_kwargs(vlm.backbone.model.generation_config, lm.config).eos_token_id
        self.cond = threading.Condition()
        self.waiting: deque[Job] = deque()
        self.lanes: dict[str, Lane] = {}
        self.alone: Job | None = None  # the request decoding alone right now
        # Each signature's batch decodes in a session of its own: a session entry is keyed by shapes and what graphs
        # bake in, not by the criterion's threshold, so two batches that differ only there would share one cache.
        # Kept while the batch closes and reopens (its buffers reused), the least recently used dropped (`_session`).
        self.sessions: OrderedDict[str, DecodeSession] = OrderedDict()
        self.accepting = True
        self.stopping = False
        self.hold = threading.Lock()  # held by each tick: whoever holds it pauses the scheduler between ticks
        self.thread = threading.Thread(target=self._run, name="freevlm-scheduler", daemon=True)
        metrics.max_batch_size = cfg.max_batch_size

    def start(self) -> None:
        self.thread.start()

    def job(self, request: ChatRequest, deliver: Callable[[tuple], None]) -> Job:
        options = replace(self.cfg.options, mode=request.mode, threshold=request.threshold,
                          max_new_tokens=request.max_tokens)
        if options.mode == "full":
            options = replace(options, kv_policy="propagate")  # no exits, nothing skipped: one batch for full depth
        return Job(request, options, steps_in_batch(self.vlm, options, request.sampling), deliver,
                   key=signature(options))

    def submit(self, job: Job) -> None:
        with self.cond:
            if not self.accepting:
                raise RequestError(SHUTTING_DOWN, code="server_shutting_down", status=503, kind="server_error")
            if len(self.waiting) >= self.cfg.max_waiting:
                raise RequestError(f"the server is busy: {len(self.waiting)} requests are waiting; retry later",
                                   code="server_busy", status=503, kind="server_error")
            self.waiting.append(job)
            self.cond.notify()

    def busy_rows(self) -> int:
        return sum(len(lane.jobs) for lane in self.lanes.values()) + (self.alone is not None)

    def stop(self, grace_s: float | None = None) -> None:
        """Refuse new requests, let those in flight finish for up to `grace_s` seconds, cancel the rest (their
        clients get a 503 error), and end the thread."""
        grace_s = self.cfg.shutdown_grace_s if grace_s is None else grace_s
        with self.cond:
            self.accepting = False
            deadline = time.monotonic() + grace_s
            while (self.waiting or self.busy_rows()) and self.thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(min(left, 0.1))
            self.stopping = True
            self.cond.notify_all()
        if self.thread.is_alive():
            self.thread.join()

    # The scheduler thread.

    def _run(self) -> None:
        with torch.no_grad():  # grad mode is per thread
            while True:
                with self.cond:
                    while not self.stopping and not self.waiting and not self.busy_rows():
                        self.cond.wait()
                    if self.stopping:
                        break
                with self.hold:
                    try:
                        self._tick()
                    except Exception:  # a bug must not end the thread: the server would hang, not fail
                        log.exception("a scheduler tick failed")
                        self._fail_running(RequestError("decoding failed: internal error", code="internal_error",
                                                        status=500, kind="server_error"))
                with self.cond:
                    self.cond.notify_all()  # `stop` waits for the work to drain
            self._cancel_everything()

    def _tick(self) -> None:
        self._admit()
        for key, lane in list(self.lanes.items()):
            self._release_cancelled(lane)
            if lane.jobs:
                self._step(key, lane)
            if not lane.jobs:
                lane.batch.close()
                del self.lanes[key]
        self._publish_load()

    def _publish_load(self) -> None:
        with self.cond:
            self.metrics.set_load(len(self.waiting), self.busy_rows())

    def _admit(self) -> None:
        """Admit waiting jobs in order while rows are free; at most one job decoded alone per tick."""
        with self.cond:
            candidates = list(self.waiting)
        self._prepare_together([j for j in candidates if j.batched and not j.cancelled.is_set()]
                               [: self.cfg.max_batch_size - self.busy_rows()])
        ran_alone = False
        for job in candidates:
            if job.cancelled.is_set():
                self._unqueue(job)
                self.metrics.count_request(job.options.mode, "cancelled")
                continue
            if not job.batched:
                if not ran_alone:
                    ran_alone = True
                    self._unqueue(job)
                    self._decode_alone(job)
                continue
            if self.busy_rows() < self.cfg.max_batch_size:
                self._admit_one(job)

    def _unqueue(self, job: Job) -> None:
        with self.cond:
            self.waiting.remove(job)
        self._publish_load()

    def _prepare_together(self, jobs: list[Job]) -> None:
        """The LM inputs of jobs about to be admitted, those with the same prompt text in one call: the vision encoder
        runs once for their images (several times cheaper than one call each). Their prompts have one length, so no
        padding enters and each row's inputs are those of a call of its own (bitwise on CPU, tested); a group the
        processor refuses is left to `_prepare`, one job at a time, so a bad image fails alone."""
        groups: dict[str, list[Job]] = {}
        for job in jobs:
            if job.lm_inputs is None and self._prompt_fits(job):
                groups.setdefault(job.request.prompt, []).append(job)
        for prompt, group in groups.items():
            if len(group) < 2 or not self.cfg.batch_vision:
                continue
            try:
                both = self.vlm.prepare([job.request.image for job in group], [prompt] * len(group))
            except Exception:
                continue
            for i, job in enumerate(group):
                job.lm_inputs = LMInputs(both.inputs_embeds[i : i + 1], both.attention_mask[i : i + 1],
                                         None if both.input_ids is None else both.input_ids[i : i + 1])
                job.prompt_tokens = int(both.inputs_embeds.shape[1])

    def _prompt_fits(self, job: Job) -> bool:
        """Whether the prompt has at most max_prompt_tokens tokens (counted once, here: the tokenizer is this
        thread's alone)."""
        if job.prompt_fits is None:
            ids = self.tokenizer(job.request.prompt, add_special_tokens=False)["input_ids"]
            job.prompt_fits = len(ids) <= self.cfg.max_prompt_tokens
        return job.prompt_fits

    def _prepare(self, job: Job) -> bool:
        """The job's LM inputs (vision encoder and projection); False (and the job failed) if it cannot fit."""
        if not self._prompt_fits(job):
            self._fail(job, RequestError(f"the prompt is longer than {self.cfg.max_prompt_tokens} tokens", "messages",
                                         "context_length_exceeded"))
            return False
        if job.lm_inputs is not None:  # prepared with others (`_prepare_together`)
            return True
        try:
            job.lm_inputs = self.vlm.prepare([job.request.image], [job.request.prompt])
        except Exception as err:  # the image or prompt the processor refuses: this request fails, no other
            self._fail(job, RequestError(f"the request could not be prepared: {type(err).__name__}: "
                                         f"{' '.join(str(err).split())}", "messages", "invalid_input"))
            return False
        job.prompt_tokens = int(job.lm_inputs.inputs_embeds.shape[1])
        return True

    def _check_context(self, job: Job, columns: int) -> bool:
        if job.prompt_tokens + job.request.max_tokens <= columns:
            return True
        self._fail(job, RequestError(
            f"the prompt ({job.prompt_tokens} tokens with the image's) plus max_tokens ({job.request.max_tokens}) "
            f"exceed this server's context of {columns} tokens", "max_tokens", "context_length_exceeded"))
        return False

    def _admit_one(self, job: Job) -> None:
        key = job.key
        lane = self.lanes.get(key)
        if lane is None and len(self.lanes) >= MAX_LANES:
            return
        if not self._prepare(job):
            self._unqueue(job)
            return
        try:
            if lane is None:
                lane = self.lanes[key] = Lane(self.vlm.rows(job.options, rows=self._rows_for(key),
                                                             columns=self.cfg.max_columns, session=self._session(key)))
        except FreeVLMError as err:
            self._unqueue(job)
            self._fail(job, RequestError(f"this decoding cannot be served: {err}", "mode"))
            return
        cache = lane.batch.engine.cache
        if not self._check_context(job, cache.max_len):
            self._unqueue(job)
            return
        fits = max(cache.length, job.prompt_tokens) + job.request.max_tokens <= cache.max_len
        outgrown = not lane.batch.free and cache.batch < self.cfg.max_batch_size
        if lane.draining or not lane.batch.free or not fits:
            lane.draining = lane.draining or not fits or outgrown
            return
        self._unqueue(job)
        row, token, layer = lane.batch.admit(job.lm_inputs)
        job.lm_inputs = None  # the row holds it now
        lane.jobs[row] = job
        self._start(job)
        if self._push(job, token, layer):
            lane.batch.release(row)
            del lane.jobs[row]

    def _rows_for(self, key: str) -> int:
        """Rows of a new batch: the waiting requests of its signature, rounded up to a power of two (at most
        max_batch_size). Every row costs compute each step, occupied or not, so a lone request decodes in a small
        batch; a batch that more requests outgrow stops admitting, drains, and reopens larger."""
        with self.cond:
            demand = sum(1 for job in self.waiting if job.batched and job.key == key)
        return min(self.cfg.max_batch_size, 1 << max(demand - 1, 0).bit_length())

    def _session(self, key: str) -> DecodeSession:
        # One entry per signature (a batch reopened with another row count replaces it) and no more sessions than
        # batches may run: each entry is a KV cache of rows x columns x layers, the server's largest allocation.
        session = self.sessions.pop(key, None)
        if session is None:  # (not `or`: an empty session is falsy)
            session = DecodeSession(max_entries=1)
        self.sessions[key] = session
        while len(self.sessions) > MAX_LANES:
            oldest = next(k for k in self.sessions if k not in self.lanes)
            del self.sessions[oldest]
        return session

    def _step(self, key: str, lane: Lane) -> None:
        try:
            out = lane.batch.step()
        except Exception as err:  # a fault in the batch: its requests fail, the server and other batches go on
            log.exception("a decode step failed")
            for job in lane.jobs.values():
                self._fail(job, RequestError(f"decoding failed: {type(err).__name__}", code="internal_error",
                                             status=500, kind="server_error"))
            lane.jobs.clear()
            self.sessions.pop(key, None)  # nothing of a failed batch is reused
            return
        for row, (token, layer) in out.items():
            job = lane.jobs[row]
            cancelled = job.cancelled.is_set()  # read once: a finished job's handler cancels it right after
            if cancelled:
                self.metrics.count_request(job.options.mode, "cancelled", job.prompt_tokens)
            if cancelled or self._push(job, token, layer):
                lane.batch.release(row)
                del lane.jobs[row]

    def _release_cancelled(self, lane: Lane) -> None:
        for row, job in list(lane.jobs.items()):
            if job.cancelled.is_set():
                self.metrics.count_request(job.options.mode, "cancelled", job.prompt_tokens)
                lane.batch.release(row)
                del lane.jobs[row]

    def _start(self, job: Job) -> None:
        job.text = TextStream(self.tokenizer, self.eos, job.request.max_tokens, job.request.stop,
                              incremental=job.request.stream)
        job.deliver(("started", job.prompt_tokens))

    def _push(self, job: Job, token: int, layer: int) -> bool:
        """One token for the job: its text delivered; True once the job is finished (and its result delivered)."""
        delta = job.text.push(token)
        job.exit_layers.append(layer)
        self.metrics.count_tokens([layer])
        if delta:
            job.deliver(("delta", delta))
        if job.text.finished:
            job.deliver(("done", job.text.finish_reason, usage(job.prompt_tokens, len(job.text.tokens)),
                         job.extension()))
            self.metrics.count_request(job.options.mode, "ok", job.prompt_tokens)
        return job.text.finished

    def _decode_alone(self, job: Job) -> None:
        """A request outside the step-level batches: `EarlyExitVLM.generate` for it alone, its tokens then handed
        out one by one as a batched request's are."""
        if not self._prepare(job) or not self._check_context(job, self.cfg.max_columns):
            return
        req = job.request
        settings = {"max_new_tokens": req.max_tokens}
        if req.sampling:
            job.seed = req.seed if req.seed is not None else secrets.randbits(63)
            torch.manual_seed(job.seed)  # only this thread draws from torch's generator
            settings.update(do_sample=True, temperature=req.temperature, top_p=req.top_p, top_k=0)
        self.alone = job
        self._publish_load()
        try:
            res = self.vlm.generate(None, None, job.options, tokenizer_decode=False, lm_inputs=job.lm_inputs,
                                    **settings)
        except FreeVLMError as err:
            self._fail(job, RequestError(f"this request cannot be decoded: {err}"))
            return
        except Exception as err:
            log.exception("a request decoded alone failed")
            self._fail(job, RequestError(f"decoding failed: {type(err).__name__}", code="internal_error",
                                         status=500, kind="server_error"))
            return
        finally:
            self.alone = None
            job.lm_inputs = None
        if res.speculative is not None:
            stats = res.speculative
            job.speculative = {"acceptance_rate": stats.acceptance_rate,
                               "tokens_per_verification": stats.tokens_per_verification}
            self.metrics.count_drafts(stats.drafted, stats.accepted)
        if job.cancelled.is_set():
            self.metrics.count_request(job.options.mode, "cancelled", job.prompt_tokens)
            return
        self._start(job)
        tokens = res.sequences[0, : len(res.trace[0])].tolist()
        for token, layer in zip(tokens, res.exit_layers[0]):
            if self._push(job, token, layer):
                break

    def _fail(self, job: Job, error: RequestError, outcome: str = "failed") -> None:
        self.metrics.count_request(job.options.mode, outcome, job.prompt_tokens)
        job.deliver(("error", error))

    def _fail_running(self, error: RequestError) -> None:
        """Fail every request holding a row, close every batch, forget their buffers."""
        for lane in self.lanes.values():
            for job in lane.jobs.values():
                self._fail(job, error)
        self.lanes.clear()
        self.sessions.clear()
        self.alone = None
        self._publish_load()

    def _cancel_everything(self) -> None:
        error = RequestError(SHUTTING_DOWN, code="server_shutting_down", status=503, kind="server_error")
        with self.cond:
            waiting, self.waiting = list(self.waiting), deque()
        for job in waiting + [job for lane in self.lanes.values() for job in lane.jobs.values()]:
            self._fail(job, error, "cancelled")
        for lane in self.lanes.values():
            lane.batch.close()
        self.lanes.clear()
        self._publish_load()
