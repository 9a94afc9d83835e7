"""Shared by the server tests: a tiny random VLM with exits, images as data URLs, raw HTTP helpers, and servers the
tests start themselves on free loopback ports (`serve_in_thread`)."""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.error
import urllib.request

from PIL import Image

from freevlm.generation.api import DecodeOptions
from freevlm.serve.config import ServeConfig

# For the tiny VLM below, alpha = 0.075 sends some tokens out at the exits and some to the last layer (checked where
# it matters): random weights are barely confident, and at 0.8 nothing would leave early.
THRESHOLD = 0.075
_VLMS: dict = {}


def tiny_vlm(family: str = "blip2-opt"):
    """A tiny random VLM (5 layers, exits at 1 and 3, a word tokenizer; built in well under a second), one per
    family and test session: every test that decodes with it computes what it expects from it."""
    if family not in _VLMS:
        from tests.generation.test_properties import api_vlm

        _VLMS[family] = api_vlm(family)
    return _VLMS[family]


def config(**overrides) -> ServeConfig:
    settings = dict(options=DecodeOptions(threshold=THRESHOLD), max_batch_size=3, max_columns=64, default_max_tokens=16,
                    max_prompt_tokens=64, max_image_bytes=64 * 1024, max_image_pixels=256 * 256,
                    max_body_bytes=1 << 20)
    return ServeConfig(**{**settings, **overrides})


def png(colour: str, size: int = 20) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(out, "PNG")
    return out.getvalue()


def data_url(colour: str, size: int = 20) -> str:
    return "data:image/png;base64," + base64.b64encode(png(colour, size)).decode()


def image(colour: str) -> Image.Image:
    """The image a server decodes from `data_url(colour)`."""
    return Image.open(io.BytesIO(png(colour))).convert("RGB")


def messages(prompt: str, colour: str = "red", url: str | None = None) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": prompt},
                                         {"type": "image_url", "image_url": {"url": url or data_url(colour)}}]}]


def post(url: str, body, headers: dict | None = None, timeout: float = 60) -> tuple[int, dict]:
    """POST raw bytes (or a JSON-encoded object): (status, decoded JSON body)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def get(url: str, headers: dict | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def metrics(url: str) -> dict[str, float]:
    """GET /metrics parsed: {'name{labels}': value}."""
    status, text = get(url + "/metrics")
    assert status == 200
    out = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_until(condition, what: str, timeout: float = 30.0) -> None:
    """Poll `condition` until it holds (a bound on waiting, not a timing assertion: it fails only if the condition
    never comes)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.01)


def expected(vlm, prompt: str, colour: str, max_tokens: int, options: DecodeOptions, **settings):
    """What `EarlyExitVLM.generate` gives for one request alone: (text, exit layers, tokens)."""
    res = vlm.generate([image(colour)], [prompt], options, max_new_tokens=max_tokens, **settings)
    n = len(res.trace[0])
    return res.texts[0], res.exit_layers[0], res.sequences[0, :n].tolist()
