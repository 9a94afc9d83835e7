"""Requests in, responses out: an OpenAI chat-completions body parsed and checked into a `ChatRequest`, and the
OpenAI-shaped bodies the server answers with (completions, stream chunks, errors).

Every problem with a request is one `RequestError`: an HTTP status and an OpenAI-style error body whose one-line
message names the field and what was wrong (`{"error": {"message", "type", "param", "code"}}`).

A request is one image and a text prompt, as the VLMs here are prompted ("a photo of", "Question: ... Answer:"): the
text parts of all messages, in order, joined by single spaces, roles ignored (no chat template). Extension fields
(documented in docs/serving.md): `mode` (early_exit | full | speculative) and `threshold` (the early-exit setting),
within what the operator allows; `seed` (standard) fixes sampling.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image, ImageOps

from freevlm.data.images import to_rgb
from freevlm.serve.config import ServeConfig

# Fields OpenAI clients may send that this server cannot honour: refused when set, not silently ignored.
UNSUPPORTED = {"tools": None, "functions": None, "tool_choice": None, "logit_bias": None, "logprobs": False,
               "top_logprobs": None, "presence_penalty": 0, "frequency_penalty": 0, "audio": None, "prediction": None}


PROMPT_CHARS_PER_TOKEN = 32  # a prompt longer than this many characters per allowed token is refused unread


class RequestError(Exception):
    """A request the server refuses: HTTP `status` and an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.kind = message, param, code, status, kind

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class ChatRequest:
    model: str  # the model id asked for
    image: Image.Image  # the request's one image, RGB
    prompt: str  # the text parts of the messages, joined by spaces
    max_tokens: int  # tokens generated at most
    mode: str  # early_exit | full | speculative
    threshold: float  # early exit's setting
    temperature: float = 0.0  # 0: greedy (the default here, unlike OpenAI's 1: FREE's decoding is greedy)
    top_p: float = 1.0  # sampling only: nucleus mass
    seed: int | None = None  # sampling only: the generator's seed (None: one is drawn and reported)
    stop: list[str] = field(default_factory=list)  # the text ends before the first of these
    stream: bool = False  # answer as server-sent events, token by token
    include_usage: bool = False  # streaming: a last chunk with token counts (stream_options.include_usage)

    @property
    def sampling(self) -> bool:
        return self.temperature > 0


def parse_json(body: bytes) -> dict:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(f"the request body is not valid JSON: {err}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    return data


def parse_chat(body: bytes, cfg: ServeConfig, exits_loaded: bool) -> ChatRequest:
    """A chat-completions body checked against the operator's limits; the image decoded (this runs off the event
    loop: decoding an image is CPU work). The prompt's tokens are counted on the scheduler thread, since a fast
    tokenizer must not be used from two threads at once (the processor changes its padding state)."""
    data = parse_json(body)
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("'model' is required: a model id from GET /v1/models", "model", "missing_required_parameter")
    if model != cfg.model_name:
        raise RequestError(f"the model {model!r} does not exist: this server serves {cfg.model_name!r}", "model",
                           "model_not_found", status=404)
    for name, default in UNSUPPORTED.items():
        if data.get(name, default) not in (default, None, [], {}):
            raise RequestError(f"'{name}' is not supported by this server", name, "unsupported_parameter")
    n = data.get("n", 1)
    if n != 1 or isinstance(n, bool):
        raise RequestError(f"'n' must be 1 (one choice per request), got {n!r}", "n", "invalid_value")
    image, prompt = parse_messages(data.get("messages"), cfg)
    if len(prompt) > PROMPT_CHARS_PER_TOKEN * cfg.max_prompt_tokens:  # the token count is the scheduler's to take
        raise RequestError(f"the prompt is longer than {cfg.max_prompt_tokens} tokens", "messages",
                           "context_length_exceeded")
    max_tokens = data.get("max_completion_tokens", data.get("max_tokens"))
    max_tokens = cfg.default_max_tokens if max_tokens is None else max_tokens
    limit = cfg.max_columns - 1
    if not _is_int(max_tokens) or not 1 <= max_tokens <= limit:
        raise RequestError(f"'max_tokens' must be an integer in [1, {limit}], got {max_tokens!r}", "max_tokens",
                           "invalid_value")
    temperature = _number(data, "temperature", 0.0, 0.0, 2.0)
    top_p = _number(data, "top_p", 1.0, 0.0, 1.0, low_open=True)
    seed = data.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**63):
        raise RequestError(f"'seed' must be an integer in [0, 2^63), got {seed!r}", "seed", "invalid_value")
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f"'stream' must be true or false, got {stream!r}", "stream", "invalid_type")
    options = data.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object", "stream_options", "invalid_type")
    mode, threshold = parse_decoding(data, cfg, exits_loaded)
    return ChatRequest(model, image, prompt, max_tokens, mode, threshold, temperature, top_p, seed,
                       parse_stop(data.get("stop"), cfg), stream, bool(options.get("include_usage", False)))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(data: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = data.get(name)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value > high or value < low or (low_open and value == low):
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise RequestError(f"'{name}' must be a number in {bounds}, got {value!r}", name, "invalid_value")
    return float(value)


def parse_decoding(data: dict, cfg: ServeConfig, exits_loaded: bool) -> tuple[str, float]:
    """The extension fields `mode` and `threshold`, within what the operator allows."""
    mode = data.get("mode", cfg.options.mode)
    if mode not in cfg.allowed_modes:
        raise RequestError(f"'mode' must be one of {', '.join(cfg.allowed_modes)} on this server, got {mode!r}",
                           "mode", "invalid_value")
    if mode != "full" and not exits_loaded:
        raise RequestError(f"mode {mode!r} needs exits, and this server loaded none (--exits)", "mode",
                           "invalid_value")
    threshold = data.get("threshold")
    if threshold is None:
        return mode, cfg.options.threshold
    if cfg.options.criterion == "confidence":
        low = max(cfg.min_threshold, 0.0)
        ok = isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and math.isfinite(threshold)
        if not ok or threshold > 1.0 or threshold < low or threshold <= 0:
            raise RequestError(f"'threshold' (the early-exit confidence) must be a number in "
                               f"{'(' if low == 0 else '['}{low:g}, 1], got {threshold!r}", "threshold",
                               "invalid_value")
        return mode, float(threshold)
    from freevlm import validate
    from freevlm.errors import FreeVLMError

    try:  # another criterion's own range (entropy, patience, similarity)
        return mode, validate.threshold(cfg.options.criterion, threshold)
    except FreeVLMError as err:
        raise RequestError(f"'threshold': {str(err).replace('--threshold ', '')}", "threshold",
                           "invalid_value") from None


def parse_stop(stop, cfg: ServeConfig) -> list[str]:
    stops = [stop] if isinstance(stop, str) else ([] if stop is None else stop)
    if (not isinstance(stops, list) or len(stops) > cfg.stop_strings
            or not all(isinstance(s, str) and s for s in stops)):
        raise RequestError(f"'stop' must be a non-empty string or a list of at most {cfg.stop_strings} of them, "
                           f"got {stop!r}", "stop", "invalid_value")
    return stops


def parse_messages(messages, cfg: ServeConfig) -> tuple[Image.Image, str]:
    """(the one image, the prompt) of the messages."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", "messages", "invalid_value")
    texts, images = [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ("system", "developer", "user", "assistant"):
            raise RequestError(f"{where} must be an object with a role (system, user, assistant)", where,
                               "invalid_value")
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise RequestError(f"{where}.content must be a string or a list of parts", where, "invalid_value")
        for j, part in enumerate(parts):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"].strip())
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise RequestError(f"{where}.content[{j}].image_url.url must be a string", where, "invalid_value")
                images.append(url)
            else:
                raise RequestError(f"{where}.content[{j}] must be a text or image_url part, got {kind!r}", where,
                                   "invalid_value")
    if len(images) != 1:
        raise RequestError(f"a request carries exactly one image (an image_url part), got {len(images)}", "messages",
                           "invalid_value")
    return read_image(images[0], cfg), " ".join(t for t in texts if t)


def read_image(url: str, cfg: ServeConfig) -> Image.Image:
    """The image of an image_url: a base64 data URL, or a local path under the allowed folder; nothing is fetched."""
    scheme = urlparse(url).scheme.lower() if "://" in url or url.startswith("data:") else ""
    if scheme in ("http", "https", "ftp"):
        raise RequestError("remote image URLs are not fetched (this server downloads nothing): send the image as a "
                           "base64 data URL (data:image/png;base64,...)", "messages", "remote_image_refused")
    if scheme == "data":
        return decode_image(data_url_bytes(url, cfg), cfg)
    if scheme not in ("", "file"):
        raise RequestError(f"image URLs of scheme {scheme!r} are not supported: send a base64 data URL", "messages",
                           "invalid_image_url")
    return decode_image(local_image_bytes(unquote(urlparse(url).path) if scheme else url, cfg), cfg)


def data_url_bytes(url: str, cfg: ServeConfig) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise RequestError("an image data URL must be base64: data:image/<type>;base64,<data>", "messages",
                           "invalid_image_url")
    if len(payload) * 3 // 4 > cfg.max_image_bytes:
        raise RequestError(f"the image is larger than {cfg.max_image_bytes} bytes", "messages", "image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("the image data URL is not valid base64", "messages", "invalid_base64") from None


def local_image_bytes(path: str, cfg: ServeConfig) -> bytes:
    if cfg.allowed_image_dir is None:
        raise RequestError("local image paths are not allowed on this server (the operator gives "
                           "--allowed-image-dir): send a base64 data URL", "messages", "local_image_refused")
    root = Path(cfg.allowed_image_dir).resolve()
    target = (root / path).resolve()  # an absolute `path` replaces root; symlinks and '..' resolved before the check
    if not target.is_relative_to(root):
        raise RequestError("the image path lies outside the folder this server reads images from", "messages",
                           "local_image_refused")
    if not target.is_file():
        raise RequestError(f"no image at {path!r} in the folder this server reads images from", "messages",
                           "image_not_found")
    if target.stat().st_size > cfg.max_image_bytes:
        raise RequestError(f"the image is larger than {cfg.max_image_bytes} bytes", "messages", "image_too_large")
    return target.read_bytes()


def decode_image(data: bytes, cfg: ServeConfig) -> Image.Image:
    """RGB, upright (EXIF), every pixel decoded now; the pixel count checked from the header before decoding."""
    if len(data) > cfg.max_image_bytes:
        raise RequestError(f"the image is larger than {cfg.max_image_bytes} bytes", "messages", "image_too_large")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > cfg.max_image_pixels:
                raise RequestError(f"the image has {width}x{height} pixels, more than {cfg.max_image_pixels}",
                                   "messages", "image_too_large")
            img.load()
            return to_rgb(ImageOps.exif_transpose(img))
    except RequestError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise RequestError(f"the image could not be decoded (not an image?): {' '.join(str(err).split())}",
                           "messages", "invalid_image") from None


class TextStream:
    """A request's text as its tokens arrive: what to send now, and whether it is finished (EOS, max_tokens, a stop
    string). The text is the tokenizer's decoding of the tokens (special tokens skipped, stripped, as `generate`
    decodes), cut before the first stop string; text that may still turn into a stop string, or an incomplete
    character, is held back until it cannot, so the deltas sent add up to the final text."""

    def __init__(self, tokenizer, eos_ids: list[int], max_tokens: int, stop: list[str], incremental: bool = True):
        self.tokenizer, self.eos, self.max_tokens, self.stop = tokenizer, set(eos_ids), max_tokens, stop
        self.incremental = incremental  # False: the text is wanted at the end only (not streamed), so decoded once
        self.tokens: list[int] = []
        self.sent = ""  # the text sent so far
        self.finish_reason: str | None = None  # stop | length, once finished

    def push(self, token: int) -> str:
        """Take one token; returns the text to send now (maybe empty)."""
        self.tokens.append(token)
        if token in self.eos:
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.max_tokens:
            self.finish_reason = "length"
        if not (self.incremental or self.stop or self.finish_reason):
            return ""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True).strip()
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            text, self.finish_reason = text[: min(cuts)], "stop"
        if self.finish_reason is None:
            hold = max((len(s) for s in self.stop), default=1) - 1
            text = text[: len(text) - hold].rstrip("\ufffd")
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def completion_body(cid: str, model: str, text: str, finish_reason: str, usage: dict, extra: dict) -> dict:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": usage, "freevlm": extra}


def chunk_body(cid: str, model: str, delta: dict, finish_reason: str | None = None, usage: dict | None = None,
               extra: dict | None = None) -> dict:
    choices = [] if usage is not None else [{"index": 0, "delta": delta, "logprobs": None,
                                             "finish_reason": finish_reason}]
    body = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": choices}
    if usage is not None:
        body["usage"] = usage
    if extra is not None:
        body["freevlm"] = extra
    return body


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
