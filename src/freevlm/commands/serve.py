"""`freevlm serve`: an OpenAI-compatible HTTP server with continuous batching over the early-exit engine
(`freevlm.serve`, docs/serving.md)."""

from __future__ import annotations

import os
from pathlib import Path

from freevlm import validate as check
from freevlm.commands.common import (
    check_inputs,
    checked_decoding,
    decode_options,
    decoding_mode,
    load_vlm,
    read_plan_for,
)
from freevlm.errors import FreeVLMError
from freevlm.generation.api import MODES

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(
    backbone: Path, exits: Path | None = None, plan: Path | None = None, mode: str = "early_exit",
    criterion: str = "confidence", threshold: float | None = None, kv_policy: str | None = None,
    draft_layer: int | None = None, draft_length: int | None = None, draft_threshold: float | None = None,
    allowed_modes: list[str] | None = None, min_threshold: float | None = None, host: str = "127.0.0.1",
    port: int = 8000, max_batch_size: int = 8, max_columns: int = 512, max_tokens: int = 64,
    allowed_image_dir: Path | None = None, api_key: str | None = None, model_name: str | None = None,
    shutdown_grace: float = 30.0, draft_exits: Path | None = None,
) -> None:
    """Serve the VLM over HTTP, OpenAI-compatible (POST /v1/chat/completions, GET /v1/models, /health, /metrics).

    backbone: transformers checkpoint folder
    exits: exit checkpoint folder (from train-exits); without it, full-depth decoding only
    plan: a plan.json from `freevlm plan` (or its folder): its exits, alpha, gates, KV policy / draft setting
    mode: a request's decoding mode when it names none: early_exit | full | speculative
    criterion: early exit: confidence | entropy | patience | similarity
    threshold: early exit: the criterion's setting when a request names none (confidence: default 0.8)
    kv_policy: early exit: propagate | copy (batched at step level) | catch_up (decoded one request at a time)
    draft_layer: speculative: the drafting exit's layer (default: the first exit)
    draft_length: speculative: drafts per round at most (default 8)
    draft_threshold: speculative: stop drafting when the exit's confidence falls below this (adaptive)
    allowed_modes: the modes a request may ask for (default: every mode the loaded model supports)
    min_threshold: the lowest early-exit threshold a request may ask for (a quality floor; default: none)
    host: the address to listen on (default: loopback only; anything else exposes the server to the network)
    port: the TCP port
    max_batch_size: requests decoded side by side at most
    max_columns: KV-cache columns of a batch: a request's prompt (image tokens included) plus max_tokens must fit
    max_tokens: max_tokens of a request that gives none
    allowed_image_dir: requests may name local image files under this folder (default: none; data URLs only)
    api_key: require 'Authorization: Bearer KEY' on /v1 (default: the FREEVLM_API_KEY environment variable, if set)
    model_name: the model id clients send (default: the backbone folder's name)
    shutdown_grace: seconds in-flight requests get to finish on shutdown (Ctrl-C) before they are cancelled
    draft_exits: speculative: separate drafting exits (e.g. train-exits --variant kd, one layer); default: --exits
    """
    threshold, kv_policy = checked_decoding(plan, mode, criterion, threshold, kv_policy, 1, max_tokens, draft_layer,
                                            draft_length, draft_threshold, None, None)
    check.integer("port", port, 0, what="a port number in [0, 65535]")
    if port > 65535:
        raise FreeVLMError(f"--port must be a port number in [0, 65535], got {port}")
    check.positive_int("max_batch_size", max_batch_size)
    check.integer("max_columns", max_columns, 2, what="an integer >= 2")
    if max_tokens >= max_columns:
        raise FreeVLMError(f"--max-tokens ({max_tokens}) must be less than --max-columns ({max_columns})")
    check.optional(check.number, "min_threshold", min_threshold, 0.0, 1.0)
    check.positive_number("shutdown_grace", shutdown_grace)
    if allowed_modes is not None:
        check.choices("allowed_modes", allowed_modes, MODES)
    if allowed_image_dir is not None and not Path(allowed_image_dir).is_dir():
        raise FreeVLMError(f"--allowed-image-dir is not a folder: {allowed_image_dir}")
    api_key = api_key if api_key is not None else os.environ.get("FREEVLM_API_KEY") or None
    check_inputs(backbone, exits, draft_exits)
    try:
        from freevlm.serve.app import serve as run_server
        from freevlm.serve.config import ServeConfig
    except ImportError as err:
        raise FreeVLMError(f"freevlm serve needs FastAPI and uvicorn: pip install 'freevlm[serve]' ({err})") from None
    mode = decoding_mode(mode, exits, draft_exits)
    possible = [m for m in MODES if m == "full" or exits is not None or (m == "speculative" and draft_exits)]
    allowed = list(allowed_modes) if allowed_modes is not None else possible
    if mode not in allowed:
        raise FreeVLMError(f"--mode {mode} is not among --allowed-modes ({', '.join(allowed)})")
    unusable = [m for m in allowed if m not in possible]
    if unusable:
        raise FreeVLMError(f"--allowed-modes {', '.join(unusable)} need exits: give --exits")
    plan_ = read_plan_for(plan, exits)
    opts = decode_options(criterion, threshold, kv_policy, 1, max_tokens, mode, draft_layer, draft_length,
                          draft_threshold, None, plan_)
    if min_threshold is not None and opts.threshold < min_threshold:
        raise FreeVLMError(f"the default threshold {opts.threshold:g} lies below --min-threshold {min_threshold:g}")
    vlm = load_vlm(backbone, exits, plan_, draft_exits)
    cfg = ServeConfig(model_name=model_name or Path(backbone).resolve().name, options=opts,
                      allowed_modes=tuple(allowed), min_threshold=min_threshold or 0.0, max_batch_size=max_batch_size,
                      max_columns=max_columns, default_max_tokens=max_tokens, allowed_image_dir=allowed_image_dir,
                      api_key=api_key, shutdown_grace_s=shutdown_grace)
    if host not in LOOPBACK and api_key is None:
        print(f"warning: listening on {host} without an API key: anyone who can reach this port can use the model")
    print(f"serving {cfg.model_name!r} on http://{host}:{port}/v1 (mode {mode}, up to {max_batch_size} requests "
          f"batched); Ctrl-C stops", flush=True)
    run_server(vlm, cfg, host, port)
