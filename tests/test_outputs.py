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



def test_a_folder_is_swapped_in_one_step_where_the_os_can(tmp_path, monkeypatch):
    from freevlm import outputs

    final, tmp = tmp_path / "report", tmp_path / ".report.tmp"
    for folder, text in ((final, "old"), (tmp, "new")):
        folder.mkdir()
        (folder / "README.md").write_text(text)
    probe_a, probe_b = tmp_path / "a", tmp_path / "b"
    probe_a.write_text("a")
    probe_b.write_text("b")
    swapped = outputs.exchange(probe_a, probe_b)
    if swapped:
        assert (probe_a.read_text(), probe_b.read_text()) == ("b", "a")
    probe_a.unlink()
    probe_b.unlink()
    renames = []
    real_rename = os.rename
    monkeypatch.setattr(outputs.os, "rename", lambda *a: renames.append(a) or real_rename(*a))
    replace_folder(tmp, final)
    assert (final / "README.md").read_text() == "new" and not tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]
    assert not renames if swapped else len(renames) == 2  # swapped: never a moment without a report


def test_staged_results_replace_the_old_files_as_one_unit_and_a_killed_commit_rolls_forward(tmp_path):
    from freevlm.outputs import JOURNAL, finish_commit, staged_results

    out = tmp_path / "sw"
    out.mkdir()
    for name in ("sweep.json", "sweep.png"):
        (out / name).write_text("old")
    with staged_results(out) as stage:
        for name in ("sweep.json", "sweep.png"):
            (stage / name).write_text("new")
    assert {p.name: p.read_text() for p in out.iterdir()} == {"sweep.json": "new", "sweep.png": "new"}

    # a failure before the commit: the old pair stays, no staging folder
    with pytest.raises(RuntimeError), staged_results(out) as stage:
        (stage / "sweep.json").write_text("newer")
        raise RuntimeError("killed")
    assert {p.name: p.read_text() for p in out.iterdir()} == {"sweep.json": "new", "sweep.png": "new"}

    # a kill in the middle of the commit (journal written, one file moved): the next claim rolls it forward
    stage = out / ".staging-999"
    stage.mkdir()
    for name in ("sweep.json", "sweep.png"):
        (stage / name).write_text("newest")
    write_json(out / JOURNAL, {"staging": stage.name, "files": ["sweep.json", "sweep.png"]})
    os.replace(stage / "sweep.json", out / "sweep.json")
    with claim_output(out, results=("sweep.json",), overwrite=True):
        pass
    assert {p.name: p.read_text() for p in out.iterdir()} == {"sweep.json": "newest", "sweep.png": "newest"}

    # a kill before the journal: the staging folder is debris, removed; the results are the old ones
    (out / ".staging-998").mkdir()
    (out / ".staging-998" / "sweep.json").write_text("half")
    finish_commit(out)
    assert {p.name: p.read_text() for p in out.iterdir()} == {"sweep.json": "newest", "sweep.png": "newest"}
