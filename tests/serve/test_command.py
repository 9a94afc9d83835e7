"""`freevlm serve` on the command line: bad arguments end in one line before anything loads, and the command
serves a saved checkpoint until stopped (SIGTERM, as a process manager stops it; Ctrl-C alike), then exits with 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from freevlm.cli import main
from tests.serve.conftest import data_url, get, post, wait_until


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny default-architecture VLM and its exits saved as `freevlm serve` reads them."""
    from freevlm.default import build_default_model
    from freevlm.exits import ExitSpec, build_exits, save_exits
    from tests.test_default import tiny_default

    root = tmp_path_factory.mktemp("serve-cli")
    bb = build_default_model(tiny_default(), seed=0)
    bb.model.save_pretrained(root / "tiny-vlm")
    bb.processor.save_pretrained(root / "tiny-vlm")
    save_exits(root / "exits", bb.lm, build_exits(bb.lm, ExitSpec("transformer", [2, 4])), "tiny")
    return root / "tiny-vlm", root / "exits"


@pytest.mark.parametrize("args, message", [
    (["--port", "70000"], "--port must be a port number in [0, 65535], got 70000"),
    (["--max-tokens", "600"], "--max-tokens (600) must be less than --max-columns (512)"),
    (["--max-batch-size", "0"], "--max-batch-size must be a positive integer, got 0"),
    (["--allowed-modes", "turbo"], "--allowed-modes must be one of early_exit, full, speculative, got 'turbo'"),
    (["--min-threshold", "2"], "--min-threshold must be a finite number in [0, 1], got 2.0"),
    (["--threshold", "1.5"], "alpha must lie in (0, 1], got 1.5"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, args, message):
    code = main(["serve", "--backbone", str(tmp_path / "nowhere"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err
    assert message in err


def test_arguments_checked_against_the_checkpoint(checkpoint, tmp_path, capsys):
    backbone, exits = checkpoint
    for args, message in (
        (["--mode", "speculative"], "--mode speculative drafts with an exit: give --exits"),
        (["--allowed-modes", "full", "early_exit"], "--allowed-modes early_exit need exits: give --exits"),
        (["--allowed-image-dir", str(tmp_path / "none")], "--allowed-image-dir is not a folder"),
    ):
        assert main(["serve", "--backbone", str(backbone), *args]) == 2
        assert message in capsys.readouterr().err
    assert main(["serve", "--backbone", str(backbone), "--exits", str(exits), "--mode", "full",
                 "--allowed-modes", "early_exit"]) == 2
    assert "--mode full is not among --allowed-modes" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_command_serves_until_stopped(checkpoint):
    backbone, exits = checkpoint
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "FREEVLM_API_KEY": "k3y"}
    proc = subprocess.Popen([sys.executable, "-m", "freevlm.cli", "serve", "--backbone", str(backbone), "--exits",
                             str(exits), "--port", str(port), "--max-columns", "64", "--max-tokens", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                return get(url + "/health")[0] == 200
            except OSError:
                return False

        wait_until(up, "the server answers", timeout=120)
        body = {"model": "tiny-vlm", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "a photo of"}, {"type": "image_url", "image_url": {"url": data_url("red")}}]}]}
        assert post(url + "/v1/chat/completions", body)[0] == 401  # FREEVLM_API_KEY is the key
        status, answer = post(url + "/v1/chat/completions", body, {"Authorization": "Bearer k3y"})
        assert status == 200 and answer["usage"]["completion_tokens"] <= 8, json.dumps(answer)
        assert answer["freevlm"]["mode"] == "early_exit" and answer["freevlm"]["batched"] is True
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, err
    assert f"serving 'tiny-vlm' on http://127.0.0.1:{port}/v1" in out
    assert "Traceback" not in err
