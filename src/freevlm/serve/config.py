"""What the operator of `freevlm serve` sets: the decoding defaults, what a request may change, and the limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from freevlm.generation.api import DecodeOptions

MiB = 1 << 20


@dataclass
class ServeConfig:
    model_name: str = "freevlm"  # the model id clients name in "model" (GET /v1/models lists it)
    options: DecodeOptions = field(default_factory=DecodeOptions)  # decoding when a request names no mode/threshold
    allowed_modes: tuple[str, ...] = ("early_exit", "full", "speculative")  # modes a request may ask for
    min_threshold: float = 0.0  # the lowest early-exit threshold a request may ask for (a quality floor)
    max_batch_size: int = 8  # requests decoded side by side (rows of the running batch)
    max_columns: int = 512  # KV-cache columns of a batch: a request's prompt plus max_tokens must fit
    batch_vision: bool = True  # requests admitted together with one prompt text share one vision-encoder call
    default_max_tokens: int = 64  # max_tokens when a request gives none
    max_prompt_tokens: int = 256  # longer text prompts are refused (400) before any work
    max_image_bytes: int = 8 * MiB  # larger encoded images are refused (400)
    max_image_pixels: int = 4096 * 4096  # larger decoded images are refused (400): decompression bombs
    max_body_bytes: int = 16 * MiB  # larger request bodies are refused (413)
    max_waiting: int = 256  # requests queued beyond this are refused (503): back-pressure, not unbounded memory
    allowed_image_dir: Path | None = None  # local image paths are read only under this folder (None: never)
    api_key: str | None = None  # when set, requests must send "Authorization: Bearer <key>" (401 otherwise)
    shutdown_grace_s: float = 30.0  # on shutdown, in-flight requests get this long to finish, then are cancelled
    stop_strings: int = 4  # at most this many `stop` strings per request (OpenAI's limit)
