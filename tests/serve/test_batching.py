"""Continuous batching: overlapping requests of different lengths, in every mode, each answered with what
`EarlyExitVLM.generate` gives for it alone; greedy early exit (propagate / copy) and full depth share decode steps,
the rest decode alone between them (docs/serving.md)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import openai
import pytest
import torch

from freevlm.generation.api import DecodeOptions
from freevlm.serve.app import serve_in_thread
from tests.serve.conftest import THRESHOLD, config, expected, messages, tiny_vlm, wait_until

OPERATORS = {  # the operator's decoding: family, options
    "propagate": ("blip2-opt", DecodeOptions(threshold=THRESHOLD)),
    "copy": ("blip2-opt", DecodeOptions(threshold=THRESHOLD, kv_policy="copy")),
    "catch_up": ("blip2-opt", DecodeOptions(threshold=THRESHOLD, kv_policy="catch_up")),
    "t5": ("blip2-t5", DecodeOptions(threshold=THRESHOLD)),
}
REQUESTS = [  # prompt, image colour, max_tokens, extension / sampling fields
    ("a photo of", "red", 10, {}),
    ("a", "blue", 6, {}),
    ("what is this a photo of the", "green", 12, {"mode": "full"}),
    ("photo", "white", 9, {"threshold": 0.08}),
    ("a photo of", "blue", 11, {"mode": "speculative"}),
    ("a", "red", 8, {"temperature": 0.9, "seed": 5}),
    ("photo of a", "yellow", 7, {}),
    ("a photo", "green", 5, {"mode": "full"}),
    ("a photo of", "white", 9, {"mode": "speculative", "temperature": 0.7, "top_p": 0.9, "seed": 11}),
]


def _alone(vlm, operator: DecodeOptions, prompt, colour, max_tokens, fields):
    options = replace(operator, mode=fields.get("mode", operator.mode),
                      threshold=fields.get("threshold", operator.threshold))
    settings = {}
    if fields.get("temperature"):
        torch.manual_seed(fields["seed"])
        settings = dict(do_sample=True, temperature=fields["temperature"], top_p=fields.get("top_p", 1.0), top_k=0)
    return expected(vlm, prompt, colour, max_tokens, options, **settings)


def _steps_in_batch(family: str, operator: DecodeOptions, fields: dict) -> bool:
    mode = fields.get("mode", operator.mode)
    return (family == "blip2-opt" and not fields.get("temperature") and mode != "speculative"
            and (mode == "full" or operator.kv_policy != "catch_up"))


@pytest.mark.parametrize("operator", list(OPERATORS))
def test_overlapping_requests_get_what_they_get_alone(operator):
    family, options = OPERATORS[operator]
    vlm = tiny_vlm(family)
    want = [_alone(vlm, options, *r) for r in REQUESTS]  # before the server: one thread decodes at a time
    with serve_in_thread(vlm, config(options=options)) as (url, app):
        scheduler = app.state.scheduler
        steps = []  # per batch step: (the batch, the requests in it), the objects kept so that ids stay unique
        step = scheduler._step

        def spy(key, lane):
            steps.append((lane, list(lane.jobs.values())))
            step(key, lane)

        scheduler._step = spy
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        with ThreadPoolExecutor(len(REQUESTS)) as pool:
            with scheduler.hold:  # every request waits, so they all overlap once the scheduler runs
                futures = []
                for i, (prompt, colour, max_tokens, fields) in enumerate(REQUESTS):
                    extension = {k: fields[k] for k in ("mode", "threshold") if k in fields}
                    sampling = {k: fields[k] for k in ("temperature", "top_p", "seed") if k in fields}
                    futures.append(pool.submit(
                        client.chat.completions.create, model="freevlm", messages=messages(prompt, colour),
                        max_tokens=max_tokens, extra_body=extension, **sampling))
                    # queued in this order, so the schedule (who joins and leaves when) is the same every run
                    wait_until(lambda n=i + 1: len(scheduler.waiting) == n, "the request queued")
            answers = [f.result() for f in futures]
    for (prompt, colour, max_tokens, fields), answer, (text, exit_layers, tokens) in zip(REQUESTS, answers, want):
        extra = answer.model_extra["freevlm"]
        assert answer.choices[0].message.content == text, (prompt, colour, fields)
        assert extra["exit_layers"] == exit_layers, (prompt, colour, fields)
        assert extra["batched"] == _steps_in_batch(family, options, fields)
        assert answer.usage.completion_tokens == len(tokens)
        assert answer.choices[0].finish_reason == ("length" if len(tokens) == max_tokens and tokens[-1] != 2
                                                   else "stop")
    if family == "blip2-opt" and operator != "catch_up":
        assert any(len(jobs) > 1 for _, jobs in steps), "batched requests must share steps"
        by_lane = {}
        for lane, jobs in steps:
            by_lane.setdefault(id(lane), []).append({id(job) for job in jobs})
        assert any(a != b and a & b for runs in by_lane.values() for a, b in zip(runs, runs[1:])), \
            "a request must join or leave while another one decodes on"
        n = vlm.backbone.lm.num_layers
        layers = [x for a in answers if a.model_extra["freevlm"]["mode"] == "early_exit"
                  for x in a.model_extra["freevlm"]["exit_layers"]]
        assert min(layers) < n and max(layers) == n, "some tokens exit early, some go to the last layer"
    assert len({tuple(tokens) for *_, tokens in want}) > 3, "different requests, different answers"


def test_row_batches_in_their_own_sessions_interleave():
    """The scheduler runs one batch per decoding signature, each in a session of its own, stepped in turn: each
    decodes as `generate` alone (a batch that fell back to the VLM's session would share a cache with the other)."""
    from freevlm.generation.session import DecodeSession
    from tests.serve.conftest import image

    vlm = tiny_vlm()
    thresholds, new = (THRESHOLD, 0.08), 8
    alone = [expected(vlm, "a photo of", "red", new, DecodeOptions(threshold=t), eos_token_id=[])[1:]
             for t in thresholds]
    assert alone[0] != alone[1], "the two settings decode differently (else the test shows little)"
    got = []
    with torch.no_grad():
        batches = [vlm.rows(DecodeOptions(threshold=t), rows=2, columns=32, session=DecodeSession(1))
                   for t in thresholds]
        for batch in batches:
            row, token, layer = batch.admit(vlm.prepare([image("red")], ["a photo of"]))
            got.append(([layer], [token], row))
        for _ in range(new - 1):
            for batch, (layers, tokens, row) in zip(batches, got):
                token, layer = batch.step()[row]
                tokens.append(token)
                layers.append(layer)
    assert batches[0].engine.cache is not batches[1].engine.cache
    assert [(layers, tokens) for layers, tokens, _ in got] == alone


def test_a_batch_outgrown_by_waiting_requests_reopens_larger():
    """A lone request decodes in a one-row batch; requests that queue behind it make the batch drain and reopen with
    a row for each (every row costs compute each step, so batches are no larger than their demand)."""
    import threading

    from tests.serve.conftest import post

    vlm = tiny_vlm()
    asks = [("a photo of", colour, n) for colour, n in (("red", 6), ("blue", 5), ("green", 7), ("white", 4))]
    want = [expected(vlm, prompt, colour, n, config().options)[0] for prompt, colour, n in asks]
    with serve_in_thread(vlm, config(max_batch_size=4)) as (url, app):
        scheduler = app.state.scheduler
        rows, go_on, step = [], threading.Event(), scheduler._step

        def spy(key, lane):
            rows.append(lane.batch.engine.cache.batch)
            step(key, lane)
            if len(rows) == 1:  # the first request waits here until the others have queued behind it
                go_on.wait(30)

        scheduler._step = spy

        def ask(prompt, colour, n):
            body = {"model": "freevlm", "messages": messages(prompt, colour), "max_tokens": n}
            return post(url + "/v1/chat/completions", body)[1]["choices"][0]["message"]["content"]

        with ThreadPoolExecutor(len(asks)) as pool:
            first = pool.submit(ask, *asks[0])
            wait_until(lambda: rows, "the first request decodes")
            rest = [pool.submit(ask, *a) for a in asks[1:]]
            wait_until(lambda: len(scheduler.waiting) == len(rest), "the others queued")
            go_on.set()
            got = [first.result()] + [f.result() for f in rest]
    assert got == want
    assert rows[0] == 1 and max(rows) == 4


def test_which_requests_decode_at_step_level():
    """The table of docs/serving.md."""
    from freevlm.serve.scheduler import steps_in_batch

    opt, t5 = tiny_vlm("blip2-opt"), tiny_vlm("blip2-t5")
    cases = [  # (vlm, options, sampling, batched)
        (opt, DecodeOptions(mode="full"), False, True),
        (opt, DecodeOptions(kv_policy="propagate"), False, True),
        (opt, DecodeOptions(kv_policy="copy"), False, True),
        (opt, DecodeOptions(kv_policy="catch_up"), False, False),
        (opt, DecodeOptions(gates="plan/gates"), False, False),
        (opt, DecodeOptions(mode="speculative"), False, False),
        (opt, DecodeOptions(), True, False),
        (opt, DecodeOptions(mode="full"), True, False),
        (t5, DecodeOptions(mode="full"), False, False),
        (t5, DecodeOptions(), False, False),
    ]
    assert [steps_in_batch(vlm, options, sampling) for vlm, options, sampling, _ in cases] == [c[-1] for c in cases]


def test_requests_admitted_together_share_a_vision_call_with_the_same_inputs():
    """Requests with one prompt text, admitted in one tick, are prepared in one call (one vision-encoder batch): each
    row's inputs equal those of a call of its own, bit for bit (else a request could decode otherwise than alone)."""
    from freevlm.serve.metrics import Metrics
    from freevlm.serve.protocol import ChatRequest
    from freevlm.serve.scheduler import Scheduler
    from tests.serve.conftest import image

    vlm = tiny_vlm()
    scheduler = Scheduler(vlm, config(), Metrics(vlm.backbone.lm.num_layers))
    colours = ["red", "blue", "green"]
    jobs = [scheduler.job(ChatRequest("freevlm", image(c), "a photo of", 5, "early_exit", THRESHOLD), print)
            for c in colours]
    calls = []
    prepare = vlm.prepare

    def counted(images, prompts, **kw):
        calls.append(len(images))
        return prepare(images, prompts, **kw)

    vlm.prepare = counted
    try:
        with torch.no_grad():
            scheduler._prepare_together(jobs)
    finally:
        del vlm.prepare
    assert calls == [3], "one call for the three"
    with torch.no_grad():
        for job, colour in zip(jobs, colours):
            alone = vlm.prepare([image(colour)], ["a photo of"])
            assert torch.equal(job.lm_inputs.inputs_embeds, alone.inputs_embeds)
            assert torch.equal(job.lm_inputs.attention_mask, alone.attention_mask)
            assert torch.equal(job.lm_inputs.input_ids, alone.input_ids)
