"""The HTTP server, driven by the official `openai` client and by raw HTTP: models, health, metrics, streaming token
by token, stop strings, bad requests (4xx with OpenAI-style bodies, while good requests go on), a client leaving
mid-stream, the API key, local image paths."""

from __future__ import annotations

import base64
import http.client
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import openai
import pytest

from freevlm.serve.app import serve_in_thread
from tests.serve.conftest import (
    THRESHOLD,
    config,
    data_url,
    expected,
    get,
    messages,
    metrics,
    png,
    post,
    tiny_vlm,
    wait_until,
)

PROMPT, COLOUR, MAX_TOKENS = "a photo of", "blue", 10  # a request whose answer has several words


@pytest.fixture(scope="module")
def server():
    vlm = tiny_vlm()
    want = expected(vlm, PROMPT, COLOUR, MAX_TOKENS, config().options)
    with serve_in_thread(vlm, config()) as (url, app):
        yield url, app, want


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def _chat(url: str, **fields) -> tuple[int, dict]:
    body = {"model": "freevlm", "messages": messages(PROMPT, COLOUR), "max_tokens": MAX_TOKENS, **fields}
    return post(url + "/v1/chat/completions", body)


def test_models_health_and_metrics(server, client):
    url, app, _ = server
    assert [m.id for m in client.models.list().data] == ["freevlm"]
    status, body = get(url + "/health")
    assert status == 200 and json.loads(body) == {"status": "ok"}
    found = metrics(url)
    for name in ("freevlm_generated_tokens_total", "freevlm_tokens_per_second", "freevlm_queue_length",
                 "freevlm_batch_size", "freevlm_draft_acceptance", "freevlm_requests_rejected_total"):
        assert name in found, name
    status, body = get(url + "/nowhere")
    assert status == 404 and set(json.loads(body)["error"]) == {"message", "type", "param", "code"}


def test_a_completion_counts_in_the_metrics(server, client):
    url, _, (text, layers, tokens) = server
    before = metrics(url)
    answer = client.chat.completions.create(model="freevlm", messages=messages(PROMPT, COLOUR), max_tokens=MAX_TOKENS)
    assert answer.choices[0].message.content == text and answer.object == "chat.completion"
    assert answer.usage.completion_tokens == len(tokens) and answer.usage.prompt_tokens > 0
    after = metrics(url)
    assert after["freevlm_generated_tokens_total"] - before["freevlm_generated_tokens_total"] == len(tokens)
    ok = 'freevlm_requests_total{mode="early_exit",outcome="ok"}'
    assert after[ok] - before.get(ok, 0) == 1
    for layer in set(layers):
        key = f'freevlm_exit_tokens_total{{layer="{layer}"}}'
        assert after[key] - before.get(key, 0) == layers.count(layer)
    fractions = [v for k, v in after.items() if k.startswith("freevlm_exit_fraction")]
    assert sum(fractions) == pytest.approx(1.0)
    assert after["freevlm_tokens_per_second"] > 0


def test_streaming_sends_each_token_as_it_comes(server, client):
    """The official client: one chunk per token that adds text, the deltas add up to the non-streamed answer, a final
    chunk with the finish reason and, when asked, one with the usage."""
    _, app, (text, _, tokens) = server
    tokenizer = app.state.scheduler.tokenizer
    chunks = list(client.chat.completions.create(model="freevlm", messages=messages(PROMPT, COLOUR),
                                                 max_tokens=MAX_TOKENS, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    wordy = [t for t in tokens if t not in tokenizer.all_special_ids]
    assert len(deltas) == len(wordy) > 1, "token by token"
    assert "".join(deltas) == text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length" if len(tokens) == MAX_TOKENS else "stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(tokens)


def test_streaming_over_raw_http_is_server_sent_events(server):
    url, _, (text, _, _) = server
    where = urlparse(url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
    body = {"model": "freevlm", "messages": messages(PROMPT, COLOUR), "max_tokens": MAX_TOKENS, "stream": True}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    events = [e for e in resp.read().decode().split("\n\n") if e]
    conn.close()
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text


def test_stop_strings_cut_the_text_streamed_or_not(server, client):
    url, _, (text, _, _) = server
    words = text.split()
    stop = next(w for w in words[1:] if w != words[0])  # a word that first appears after the start
    want = text[: text.index(stop)]
    status, body = _chat(url, stop=[stop, "never appears"])
    assert status == 200 and body["choices"][0]["message"]["content"] == want
    assert body["choices"][0]["finish_reason"] == "stop"
    stream = client.chat.completions.create(model="freevlm", messages=messages(PROMPT, COLOUR),
                                            max_tokens=MAX_TOKENS, stream=True, stop=stop)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want


def test_per_request_mode_and_threshold(server, client):
    vlm = tiny_vlm()
    for fields in ({"mode": "full"}, {"threshold": 0.08}, {"mode": "speculative"}):
        options = config().options
        from dataclasses import replace

        options = replace(options, **fields)
        text, layers, _ = expected(vlm, "a", "white", 8, options)
        answer = client.chat.completions.create(model="freevlm", messages=messages("a", "white"), max_tokens=8,
                                                extra_body=fields)
        extra = answer.model_extra["freevlm"]
        assert answer.choices[0].message.content == text and extra["exit_layers"] == layers
        assert extra["mode"] == fields.get("mode", "early_exit")
        if fields.get("mode") == "speculative":
            assert 0 <= extra["speculative"]["acceptance_rate"] <= 1
    assert metrics(server[0])["freevlm_draft_tokens_total"] > 0


def test_sampling_is_reproducible_by_seed(server, client):
    def ask(seed):
        answer = client.chat.completions.create(model="freevlm", messages=messages("a", "red"), max_tokens=10,
                                                temperature=1.5, seed=seed)
        return answer.choices[0].message.content, answer.model_extra["freevlm"]["seed"]

    first = ask(1)
    assert ask(1) == first and first[1] == 1
    assert len({ask(seed)[0] for seed in range(2, 6)} | {first[0]}) > 1, "other seeds, other samples"
    drawn = client.chat.completions.create(model="freevlm", messages=messages("a", "red"), max_tokens=4,
                                           temperature=1.0)
    assert isinstance(drawn.model_extra["freevlm"]["seed"], int), "a drawn seed is reported, to replay the sample"


def _b64(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _with_image(url: str, prompt: str = PROMPT) -> dict:
    return {"model": "freevlm", "messages": messages(prompt, url=url)}


GOOD = {"model": "freevlm", "messages": messages(PROMPT, COLOUR)}
BAD_REQUESTS = {  # name: (body, status, param, code)
    "malformed JSON": (b'{"model": "freevlm", "messages": [', 400, None, "invalid_json"),
    "not an object": (b"[1, 2]", 400, None, "invalid_json"),
    "unknown model": ({**GOOD, "model": "gpt-4o"}, 404, "model", "model_not_found"),
    "no model": ({"messages": GOOD["messages"]}, 400, "model", "missing_required_parameter"),
    "no messages": ({"model": "freevlm"}, 400, "messages", "invalid_value"),
    "bad base64": (_with_image("data:image/png;base64,@@not-base64@@"), 400, "messages", "invalid_base64"),
    "not base64 data URL": (_with_image("data:image/png,rawbytes"), 400, "messages", "invalid_image_url"),
    "a non-image": (_with_image(_b64(b"hello, I am text, not a picture")), 400, "messages", "invalid_image"),
    "truncated image": (_with_image(_b64(png("red")[:60])), 400, "messages", "invalid_image"),
    "oversized image bytes": (_with_image(_b64(bytes(100_000))), 400, "messages", "image_too_large"),
    "oversized image pixels": (_with_image(_b64(png("red", 300))), 400, "messages", "image_too_large"),
    "oversized prompt": (_with_image(data_url("red"), "a photo of " * 40), 400, "messages",
                         "context_length_exceeded"),
    "prompt far too long to read": (_with_image(data_url("red"), "word " * 1000), 400, "messages",
                                    "context_length_exceeded"),
    "prompt and max_tokens past the context": ({**GOOD, "max_tokens": 63}, 400, "max_tokens",
                                               "context_length_exceeded"),
    "remote image URL": (_with_image("https://example.com/cat.png"), 400, "messages", "remote_image_refused"),
    "local path not allowed": (_with_image("/etc/hostname"), 400, "messages", "local_image_refused"),
    "no image": ({**GOOD, "messages": [{"role": "user", "content": "a photo of"}]}, 400, "messages",
                 "invalid_value"),
    "two images": ({**GOOD, "messages": GOOD["messages"] * 2}, 400, "messages", "invalid_value"),
    "unknown part": ({**GOOD, "messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "messages[0]",
                     "invalid_value"),
    "temperature above 2": ({**GOOD, "temperature": 2.5}, 400, "temperature", "invalid_value"),
    "negative temperature": ({**GOOD, "temperature": -0.1}, 400, "temperature", "invalid_value"),
    "top_p 0": ({**GOOD, "top_p": 0}, 400, "top_p", "invalid_value"),
    "top_p above 1": ({**GOOD, "top_p": 1.5}, 400, "top_p", "invalid_value"),
    "max_tokens 0": ({**GOOD, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    "max_tokens huge": ({**GOOD, "max_tokens": 10**9}, 400, "max_tokens", "invalid_value"),
    "max_tokens a string": ({**GOOD, "max_tokens": "5"}, 400, "max_tokens", "invalid_value"),
    "threshold above 1": ({**GOOD, "threshold": 1.5}, 400, "threshold", "invalid_value"),
    "threshold 0": ({**GOOD, "threshold": 0}, 400, "threshold", "invalid_value"),
    "n = 2": ({**GOOD, "n": 2}, 400, "n", "invalid_value"),
    "unknown mode": ({**GOOD, "mode": "turbo"}, 400, "mode", "invalid_value"),
    "too many stop strings": ({**GOOD, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value"),
    "bad seed": ({**GOOD, "seed": -1}, 400, "seed", "invalid_value"),
    "tools": ({**GOOD, "tools": [{"type": "function"}]}, 400, "tools", "unsupported_parameter"),
    "body too large": ({**GOOD, "padding": "x" * (1 << 20)}, 413, None, "body_too_large"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_openai_style_errors(server, case):
    body, status, param, code = BAD_REQUESTS[case]
    got, answer = post(server[0] + "/v1/chat/completions", body)
    assert got == status
    assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}
    error = answer["error"]
    assert (error["param"], error["code"]) == (param, code)
    assert error["message"] and "\n" not in error["message"]


def test_bad_requests_do_not_disturb_a_good_one(server, client):
    """A good request waits in the queue while bad ones (malformed, oversized, failing inside the scheduler) come
    and go; it is then answered exactly, and the server goes on."""
    url, app, (text, _, _) = server
    scheduler = app.state.scheduler
    bad = [BAD_REQUESTS[c][0] for c in ("malformed JSON", "a non-image", "body too large",
                                        "prompt and max_tokens past the context", "oversized image pixels")]
    with ThreadPoolExecutor(len(bad) + 1) as pool:
        with scheduler.hold:
            good = pool.submit(client.chat.completions.create, model="freevlm", messages=messages(PROMPT, COLOUR),
                               max_tokens=MAX_TOKENS)
            wait_until(lambda: len(scheduler.waiting) == 1, "the good request queued")
            refused = [pool.submit(post, url + "/v1/chat/completions", b) for b in bad]
            statuses = []
            for future in refused[:3] + refused[4:]:  # refused before reaching the scheduler, which is held
                statuses.append(future.result()[0])
        statuses.append(refused[3].result()[0])  # refused by the scheduler, after the good one was admitted
        assert all(400 <= s < 500 for s in statuses)
        assert good.result().choices[0].message.content == text
    assert json.loads(get(url + "/health")[1]) == {"status": "ok"}
    assert client.chat.completions.create(model="freevlm", messages=messages(PROMPT, COLOUR),
                                          max_tokens=MAX_TOKENS).choices[0].message.content == text


def test_a_client_leaving_mid_stream_frees_its_row():
    vlm = tiny_vlm()
    max_tokens = 100  # full depth runs to 100 tokens on this request (checked): only the disconnect can end it early
    assert len(expected(vlm, PROMPT, "red", max_tokens, config().options, mode="full")[2]) == max_tokens
    with serve_in_thread(vlm, config(max_columns=128)) as (url, app):
        scheduler = app.state.scheduler
        go_on, step = threading.Event(), scheduler._step

        def paused_step(key, lane):  # after each step the scheduler waits until the test lets it go on
            step(key, lane)
            go_on.wait(30)

        scheduler._step = paused_step
        where = urlparse(url)
        conn = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
        body = {"model": "freevlm", "messages": messages(PROMPT, "red"), "max_tokens": max_tokens, "stream": True,
                "mode": "full"}
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.readline().startswith(b"data: ")  # the first event: the request holds a row
        (job,) = [job for lane in list(scheduler.lanes.values()) for job in list(lane.jobs.values())]
        assert scheduler.busy_rows() == 1
        conn.sock.shutdown(2)  # the client goes away
        conn.close()
        wait_until(job.cancelled.is_set, "the server noticed the client leave")
        go_on.set()
        wait_until(lambda: scheduler.busy_rows() == 0 and metrics(url)["freevlm_batch_size"] == 0, "the row freed")
        found = metrics(url)
        assert found['freevlm_requests_total{mode="full",outcome="cancelled"}'] == 1
        assert found["freevlm_generated_tokens_total"] < max_tokens
        assert 'freevlm_requests_total{mode="full",outcome="ok"}' not in found
        assert not scheduler.lanes, "the emptied batch is closed"
        assert _chat(url, mode="full", max_tokens=5)[0] == 200  # the server goes on


def test_a_client_leaving_before_its_answer_frees_its_row():
    """Not streamed: the server notices the closed connection while the request decodes and cancels it."""
    with serve_in_thread(tiny_vlm(), config(max_columns=128)) as (url, app):
        scheduler = app.state.scheduler
        go_on, step = threading.Event(), scheduler._step

        def paused_step(key, lane):
            step(key, lane)
            go_on.wait(30)

        scheduler._step = paused_step
        where = urlparse(url)
        conn = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
        body = {"model": "freevlm", "messages": messages(PROMPT, "red"), "max_tokens": 100, "mode": "full"}
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        wait_until(lambda: scheduler.busy_rows() == 1, "the request decodes")
        (job,) = [job for lane in list(scheduler.lanes.values()) for job in list(lane.jobs.values())]
        conn.sock.shutdown(2)
        conn.close()
        wait_until(job.cancelled.is_set, "the server noticed the client leave")
        go_on.set()
        wait_until(lambda: scheduler.busy_rows() == 0, "the row freed")
        assert metrics(url)['freevlm_requests_total{mode="full",outcome="cancelled"}'] == 1


def test_the_api_key_guards_the_v1_routes():
    with serve_in_thread(tiny_vlm(), config(api_key="sekrit")) as (url, _):
        status, body = _chat(url)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="sekrit", max_retries=0)
        assert good.chat.completions.create(model="freevlm", messages=messages("a", "red"), max_tokens=3).choices
        assert get(url + "/health")[0] == 200 and get(url + "/metrics")[0] == 200  # probes need no key


def test_local_images_only_under_the_allowed_folder(tmp_path):
    allowed = tmp_path / "images"
    allowed.mkdir()
    (allowed / "red.png").write_bytes(png("red"))
    (tmp_path / "secret.png").write_bytes(png("blue"))
    (allowed / "link.png").symlink_to(tmp_path / "secret.png")
    vlm = tiny_vlm()
    text = expected(vlm, PROMPT, "red", 6, config().options)[0]
    with serve_in_thread(vlm, config(allowed_image_dir=allowed)) as (url, _):
        for ref in ("red.png", str(allowed / "red.png"), (allowed / "red.png").as_uri()):
            status, body = post(url + "/v1/chat/completions", {**_with_image(ref), "max_tokens": 6})
            assert status == 200 and body["choices"][0]["message"]["content"] == text, ref
        for ref, code in (("../secret.png", "local_image_refused"), (str(tmp_path / "secret.png"),
                                                                     "local_image_refused"),
                          ("link.png", "local_image_refused"), ("missing.png", "image_not_found")):
            status, body = post(url + "/v1/chat/completions", _with_image(ref))
            assert status == 400 and body["error"]["code"] == code, ref


def test_operator_limits_on_modes_and_thresholds():
    cfg = config(allowed_modes=("early_exit",), min_threshold=0.07)
    with serve_in_thread(tiny_vlm(), cfg) as (url, _):
        status, body = _chat(url, mode="full")
        assert status == 400 and "early_exit" in body["error"]["message"]
        status, body = _chat(url, threshold=0.05)
        assert status == 400 and "[0.07, 1]" in body["error"]["message"]
        assert _chat(url, threshold=0.07)[0] == 200 and _chat(url)[0] == 200
    with serve_in_thread(tiny_vlm(), config(allowed_modes=("full",))) as (url, _):
        assert _chat(url, mode="full", threshold=THRESHOLD)[0] == 200


def test_concurrent_clients_each_get_their_answer(server, client):
    """More clients than rows: each gets what it gets alone."""
    vlm = tiny_vlm()
    asks = [("a photo of", c, n) for c, n in (("red", 4), ("blue", 9), ("green", 6), ("white", 3), ("yellow", 8))]
    want = [expected(vlm, p, c, n, config().options)[0] for p, c, n in asks]
    with ThreadPoolExecutor(len(asks)) as pool:
        got = list(pool.map(lambda a: client.chat.completions.create(
            model="freevlm", messages=messages(a[0], a[1]), max_tokens=a[2]).choices[0].message.content, asks))
    assert got == want


def test_a_fault_in_a_decode_step_fails_only_that_batch(server, client):
    url, app, (text, _, _) = server
    scheduler = app.state.scheduler
    step = scheduler._step

    def faulty(key, lane):  # the batch's next step raises, once
        def boom():
            raise RuntimeError("injected fault")

        lane.batch.step = boom
        scheduler._step = step
        step(key, lane)

    scheduler._step = faulty
    status, body = _chat(url)
    assert status == 500 and body["error"]["code"] == "internal_error" and body["error"]["type"] == "server_error"
    wait_until(lambda: scheduler.busy_rows() == 0 and not scheduler.lanes, "the failed batch closed")
    answer = client.chat.completions.create(model="freevlm", messages=messages(PROMPT, COLOUR), max_tokens=MAX_TOKENS)
    assert answer.choices[0].message.content == text, "the server goes on"


def test_a_request_the_model_cannot_prepare_fails_alone(server, client, monkeypatch):
    url, app, (text, _, _) = server
    vlm = app.state.scheduler.vlm
    prepare = vlm.prepare

    def refuse_red(images, prompts, **kw):
        if images[0].getpixel((0, 0)) == (255, 0, 0):
            raise ValueError("the processor refuses this image")
        return prepare(images, prompts, **kw)

    monkeypatch.setattr(vlm, "prepare", refuse_red)
    status, body = post(url + "/v1/chat/completions", {**GOOD, "messages": messages(PROMPT, "red"), "max_tokens": 4})
    assert status == 400 and body["error"]["code"] == "invalid_input"
    assert "refuses this image" in body["error"]["message"]
    answer = client.chat.completions.create(model="freevlm", messages=messages(PROMPT, COLOUR), max_tokens=MAX_TOKENS)
    assert answer.choices[0].message.content == text
