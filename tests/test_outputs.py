"""Outputs are never lost: atomic writes, refusing to overwrite results, writability checks, one run per --out."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from freevlm.errors import FreeVLMError
from freevlm.outputs import LOCK_NAME, atomic_write, claim_output, replace_folder, write_json


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = write_json(tmp_path / "r.json", {"v": 1})

    def fail(tmp):
        tmp.write_text('{"v": 2, "trunc')  # half written, then the writer dies
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(path, fail)
    assert path.read_text() == '{\n  "v": 1\n}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_a_write_into_a_missing_folder_is_one_line(tmp_path):
    with pytest.raises(FreeVLMError, match=r"cannot write .*r\.json: No such file or directory"):
        write_json(tmp_path / "gone" / "r.json", {})


def test_replacing_a_folder_keeps_one_complete_version(tmp_path):
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "old.md").write_text("old")
    (tmp_path / ".report.tmp").mkdir()
    (tmp_path / ".report.tmp" / "new.md").write_text("new")
    replace_folder(tmp_path / ".report.tmp", tmp_path / "report")
    assert [p.name for p in tmp_path.iterdir()] == ["report"]
    assert [p.name for p in (tmp_path / "report").iterdir()] == ["new.md"]


def test_results_are_refused_unless_overwrite_and_kept_until_replaced(tmp_path):
    out = tmp_path / "sweep"
    with claim_output(out, results=("sweep.json",)):
        write_json(out / "sweep.json", {"run": 1})
    assert not (out / LOCK_NAME).exists()
    with pytest.raises(FreeVLMError, match=r"already holds results \(sweep.json\); pass --overwrite"), \
            claim_output(out, results=("sweep.json",)):
        pass
    with pytest.raises(RuntimeError), claim_output(out, results=("sweep.json",), overwrite=True):
        raise RuntimeError("the overwriting run fails half-way")
    assert (out / "sweep.json").read_text() == '{\n  "run": 1\n}'  # the old results are still there
    with claim_output(out / "notes.txt", file=True):  # a file output beside them is its own result
        pass
    with pytest.raises(FreeVLMError, match="is a file; give a folder"), claim_output(out / "sweep.json"):
        pass


def test_a_second_run_on_the_same_out_is_refused_with_the_holders_pid(tmp_path):
    """Two claims in one process conflict as two processes would: flock locks belong to each open() of the file."""
    out = tmp_path / "r.json"
    with claim_output(out, file=True):
        with pytest.raises(FreeVLMError, match=rf"{out} is in use by another freevlm run \(PID {os.getpid()},"), \
                claim_output(out, file=True):
            pass
        # the other rank of a distributed run does not take the lock
        with claim_output(out, file=True, main=False):
            pass
    with claim_output(out, file=True):  # released: free again
        pass


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_note(tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / LOCK_NAME).write_text(f"{pid}\n")  # what a run killed with -9 leaves behind
    with claim_output(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"
    assert f"taking over the lock on {tmp_path} left by PID {pid}" in capsys.readouterr().err
    assert not (tmp_path / LOCK_NAME).exists()

