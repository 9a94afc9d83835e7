"""The HTTP layer: FastAPI routes over the scheduler, served by uvicorn.

Routes: POST /v1/chat/completions (JSON or server-sent events), GET /v1/models, GET /health, GET /metrics. The event
loop only parses, waits and writes: images are decoded in Starlette's thread pool, and all model work runs on the
scheduler's thread, which hands each request's events to the loop (`call_soon_threadsafe`). When the API key is set,
the /v1 routes need it (as vLLM's server does; /health and /metrics stay open to probes and scrapers).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
import signal
import socket
import threading
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from freevlm.generation.api import EarlyExitVLM
from freevlm.serve.config import ServeConfig
from freevlm.serve.metrics import Metrics
from freevlm.serve.protocol import (
    RequestError,
    chunk_body,
    completion_body,
    completion_id,
    error_body,
    parse_chat,
)
from freevlm.serve.scheduler import Job, Scheduler

log = logging.getLogger("freevlm.serve")

DRAIN_FACTOR = 8  # an oversized request body is read (and dropped) up to this many times the limit


class JobStream(StreamingResponse):
    """Server-sent events of one job; however the response ends (finished, client gone, shutdown), the job is
    cancelled, so a client that disconnects mid-stream frees its row at the next step."""

    def __init__(self, content, job: Job):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def build_app(vlm: EarlyExitVLM, cfg: ServeConfig) -> FastAPI:
    metrics = Metrics(vlm.backbone.lm.num_layers)
    scheduler = Scheduler(vlm, cfg, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        yield
        await run_in_threadpool(scheduler.stop)

    app = FastAPI(title="freevlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.metrics = scheduler, metrics

    @app.exception_handler(RequestError)
    async def request_error(request: Request, err: RequestError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(err.detail), kind), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception):
        log.exception("request failed")
        return JSONResponse(error_body(f"internal error: {type(err).__name__}", "server_error", None,
                                       "internal_error"), status_code=500)

    def authorize(request: Request) -> None:
        if cfg.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {cfg.api_key}".encode()):
            raise RequestError("invalid or missing API key (send 'Authorization: Bearer <key>')",
                               code="invalid_api_key", status=401, kind="authentication_error")

    async def read_body(request: Request) -> bytes:
        too_large = RequestError(f"the request body is larger than {cfg.max_body_bytes} bytes",
                                 code="body_too_large", status=413)
        declared = request.headers.get("content-length")
        body = bytearray()
        over = declared is not None and declared.isdigit() and int(declared) > cfg.max_body_bytes
        seen = 0
        async for piece in request.stream():
            seen += len(piece)
            if not over:
                body += piece
                over = len(body) > cfg.max_body_bytes
            # An oversized body is read to its end (and dropped) before the 413 goes out: a client still sending it
            # when the server answers and closes gets a broken pipe instead of the answer. Past DRAIN_FACTOR times
            # the limit the connection is cut (the client then sees no 413; nothing more is read).
            if over and seen > DRAIN_FACTOR * cfg.max_body_bytes:
                break
        if over:
            raise too_large
        return bytes(body)

    @app.get("/health")
    async def health():
        return {"status": "ok" if scheduler.accepting and scheduler.thread.is_alive() else "stopping"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": 0,
                                            "owned_by": "freevlm"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        authorize(request)
        try:
            body = await read_body(request)
            req = await run_in_threadpool(parse_chat, body, cfg, vlm.exits is not None)
        except RequestError:
            metrics.count_rejected()
            raise
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def deliver(event: tuple) -> None:  # on the scheduler thread
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening any more
                loop.call_soon_threadsafe(events.put_nowait, event)

        job = scheduler.job(req, deliver)
        try:
            scheduler.submit(job)
        except RequestError:  # the queue is full, or the server is stopping
            metrics.count_rejected()
            raise
        first = None
        try:  # started, or refused: the status is known before anything is sent
            first = await next_event(events, request)
        finally:
            if first is None:  # the client left (or this handler was cancelled) while the request waited
                job.cancel()
        if first is None:
            return None
        if first[0] == "error":
            raise first[1]
        cid = completion_id()
        if req.stream:
            return JobStream(stream(job, events, cid, req.model, req.include_usage), job)
        try:
            return await complete(events, cid, req.model, request)
        finally:
            job.cancel()  # a no-op once done; frees the row if the client left or this handler was cancelled

    return app


DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


async def next_event(events: asyncio.Queue, request: Request) -> tuple | None:
    """The job's next event; None once the client has gone away (checked every DISCONNECT_POLL_S)."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                return None


async def complete(events: asyncio.Queue, cid: str, model: str, request: Request) -> dict | None:
    """The whole answer, once done; None if the client went away first (the caller then cancels the job)."""
    text = []
    while True:
        event = await next_event(events, request)
        if event is None:
            return None
        if event[0] == "delta":
            text.append(event[1])
        elif event[0] == "done":
            _, finish_reason, counts, extra = event
            return completion_body(cid, model, "".join(text), finish_reason, counts, extra)
        elif event[0] == "error":
            raise event[1]


async def stream(job: Job, events: asyncio.Queue, cid: str, model: str, include_usage: bool):
    yield sse(chunk_body(cid, model, {"role": "assistant", "content": ""}))
    while True:
        event = await events.get()
        if event[0] == "delta":
            yield sse(chunk_body(cid, model, {"content": event[1]}))
        elif event[0] == "done":
            _, finish_reason, counts, extra = event
            yield sse(chunk_body(cid, model, {}, finish_reason, extra=extra))
            if include_usage:
                yield sse(chunk_body(cid, model, {}, usage=counts))
            break
        elif event[0] == "error":  # after the 200 went out, an error can only be an event
            yield sse(event[1].body())
            break
    yield sse("[DONE]")


class GracefulServer(uvicorn.Server):
    """uvicorn, whose shutdown first drains the scheduler: requests in flight get `shutdown_grace_s` to finish, then
    are cancelled with an error (a 503 body, or an error event and [DONE] on a stream), so every response ends
    cleanly before uvicorn's own deadline, past which it would cut connections."""

    def __init__(self, app: FastAPI, cfg: ServeConfig, host: str, port: int, log_level: str = "info"):
        super().__init__(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                        timeout_graceful_shutdown=math.ceil(cfg.shutdown_grace_s) + 5))
        self.app, self.grace_s = app, cfg.shutdown_grace_s

    async def shutdown(self, sockets=None) -> None:
        drain = asyncio.get_running_loop().run_in_executor(None, self.app.state.scheduler.stop, self.grace_s)
        await super().shutdown(sockets)  # stops listening, waits for the responses in flight
        await drain


def serve(vlm: EarlyExitVLM, cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM: in-flight requests finish, up to `cfg.shutdown_grace_s`)."""
    server = GracefulServer(build_app(vlm, cfg), cfg, host, port)
    # uvicorn shuts down gracefully on SIGINT / SIGTERM, then raises the signal again: that is the way out, not an
    # error, so SIGTERM is ignored then and SIGINT's KeyboardInterrupt swallowed.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def serve_in_thread(vlm: EarlyExitVLM, cfg: ServeConfig, host: str = "127.0.0.1") -> Iterator[tuple[str, FastAPI]]:
    """A server on a free port of `host` in a background thread (tests, benchmarks): yields (base URL, app); shut
    down gracefully on exit."""
    app = build_app(vlm, cfg)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = GracefulServer(app, cfg, host, port, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="freevlm-http", daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server did not start")
            threading.Event().wait(0.01)
        app.state.server = server
        yield f"http://{host}:{port}", app
    finally:
        server.should_exit = True
        thread.join()
        sock.close()
