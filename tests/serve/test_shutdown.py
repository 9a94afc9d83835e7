"""Graceful shutdown: requests in flight finish; what cannot finish within the grace period is cancelled cleanly
(its row freed, its client's stream ended); queued requests get a 503 error; nothing is accepted afterwards."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import pytest

from freevlm.serve.app import serve_in_thread
from freevlm.serve.metrics import Metrics
from freevlm.serve.protocol import ChatRequest, RequestError
from freevlm.serve.scheduler import Scheduler
from tests.serve.conftest import THRESHOLD, config, expected, image, messages, post, tiny_vlm, wait_until


def _refuses_connections(url: str) -> bool:
    where = urlparse(url)
    try:
        socket.create_connection((where.hostname, where.port), timeout=1).close()
    except OSError:
        return True
    return False


def test_shutdown_lets_a_request_in_flight_finish():
    vlm = tiny_vlm()
    text = expected(vlm, "a photo of", "green", 8, config().options)[0]
    with serve_in_thread(vlm, config()) as (url, app):
        scheduler = app.state.scheduler
        with ThreadPoolExecutor(1) as pool:
            with scheduler.hold:
                answer = pool.submit(post, url + "/v1/chat/completions",
                                     {"model": "freevlm", "messages": messages("a photo of", "green"),
                                      "max_tokens": 8})
                wait_until(lambda: len(scheduler.waiting) == 1, "the request queued")
                app.state.server.should_exit = True
                wait_until(lambda: _refuses_connections(url), "the server stopped listening")
            status, body = answer.result()
    assert status == 200 and body["choices"][0]["message"]["content"] == text
    assert not scheduler.thread.is_alive()


def test_shutdown_cancels_a_stream_that_outlasts_the_grace_period():
    vlm = tiny_vlm()
    with serve_in_thread(vlm, config(shutdown_grace_s=0.5)) as (url, app):
        scheduler, metrics = app.state.scheduler, app.state.metrics
        go_on, step = threading.Event(), scheduler._step

        def paused_step(key, lane):  # the request cannot finish before the test lets the scheduler go on
            step(key, lane)
            go_on.wait(30)

        scheduler._step = paused_step
        where = urlparse(url)
        conn = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
        body = {"model": "freevlm", "messages": messages("a photo of", "red"), "max_tokens": 40, "stream": True}
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: ")
        app.state.server.should_exit = True
        wait_until(lambda: scheduler.stopping, "the grace period over")
        go_on.set()
        events = [e for e in resp.read().decode().split("\n\n") if e]
        conn.close()
    assert events[-1] == "data: [DONE]", "the stream ends cleanly"
    error = json.loads(events[-2][len("data: "):])["error"]
    assert error["code"] == "server_shutting_down" and error["type"] == "server_error"
    assert not scheduler.thread.is_alive() and scheduler.busy_rows() == 0
    assert metrics.requests[("early_exit", "cancelled")] == 1 and metrics.requests[("early_exit", "ok")] == 0


def test_stopping_the_scheduler_answers_queued_requests_with_503():
    vlm = tiny_vlm()
    scheduler = Scheduler(vlm, config(), Metrics(vlm.backbone.lm.num_layers))
    scheduler.start()
    events: list[list] = [[], []]
    request = ChatRequest("freevlm", image("red"), "a photo of", 10, "early_exit", THRESHOLD)
    with scheduler.hold:
        for out in events:
            scheduler.submit(scheduler.job(request, out.append))
        stopper = threading.Thread(target=scheduler.stop, args=(0.0,))
        stopper.start()
        wait_until(lambda: not scheduler.accepting, "new requests refused")
        with pytest.raises(RequestError) as refused:
            scheduler.submit(scheduler.job(request, print))
        assert refused.value.status == 503
    stopper.join(30)
    assert not scheduler.thread.is_alive()
    for out in events:
        kind, error = out[-1]
        assert kind == "error" and error.status == 503 and error.code == "server_shutting_down"
        assert not [e for e in out if e[0] == "done"]
