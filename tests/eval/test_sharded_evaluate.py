"""`freevlm evaluate` sharded over 2 processes with accelerate gives the predictions of 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from freevlm.data.synthetic import SyntheticConfig, write_synthetic
from freevlm.default import build_default_model
from tests.test_default import tiny_default

ROOT = Path(__file__).resolve().parents[2]


def _evaluate(nproc: int, backbone: Path, data: Path, out: Path) -> dict:
    # this checkout's src first: the venv may hold an editable install of another checkout (a git worktree)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(29600 + nproc + os.getpid() % 1000), "-m", "freevlm.cli", "evaluate", "--backbone", str(backbone),
           "--out", str(out), "--data", str(data), "--split", "test", "--no-official", "--batch-size", "1",
           "--max-new-tokens", "6", "--no-progress"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_two_processes_give_the_predictions_of_one(tmp_path):
    data = write_synthetic(SyntheticConfig(n_train=2, n_val=2, n_test=5, n_nocaps=2, n_dialogs=1), tmp_path / "d")
    backbone = build_default_model(tiny_default(), seed=0)
    backbone.model.save_pretrained(tmp_path / "bb")
    backbone.processor.save_pretrained(tmp_path / "bb")
    one = _evaluate(1, tmp_path / "bb", data.root, tmp_path / "one.json")
    two = _evaluate(2, tmp_path / "bb", data.root, tmp_path / "two.json")
    assert len(one["predictions"]) == len(two["predictions"]) == 5
    assert sorted(map(json.dumps, one["predictions"])) == sorted(map(json.dumps, two["predictions"]))
    assert one["metrics"] == two["metrics"]
