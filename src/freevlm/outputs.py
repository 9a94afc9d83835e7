"""Writing results so that none is ever lost: every output file and checkpoint goes through here.

- `atomic_write` (and `write_text` / `write_json`): the bytes go to a temporary file in the target's own folder, are
  fsynced, then renamed over the target (`os.replace`), and the folder is fsynced. A crash, a full disk or a kill
  leaves either the old file or the new one, never a half-written one.
- `replace_folder`: the same for a folder built in a temporary sibling (a backbone checkpoint, a report).
- `claim_output`: what a command does before any work with its `--out`: refuse it when it already holds results
  (unless `overwrite`), prove it writable by creating a file there, and hold a lock file with this process's PID for
  the whole run so that a second run on the same `--out` is refused instead of silently losing one result.

The lock is an `fcntl.flock` on `<out>/.freevlm.lock` (for a file output: `.<name>.lock` beside it). The kernel drops
the lock when its holder dies, so a lock file left by a killed run is stale by construction: it is taken over, with
a note naming the PID that left it. The PID in the file is for the messages; the flock is what excludes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from safetensors import SafetensorError  # safetensors reports a failed write (a full disk) as its own error

from freevlm.errors import FreeVLMError

try:  # POSIX; elsewhere the lock falls back to exclusive creation (a stale lock must then be removed by hand)
    import fcntl
except ImportError:  # pragma: no cover - not on Linux/macOS
    fcntl = None

LOCK_NAME = ".freevlm.lock"
WRITE_ERRORS = (OSError, SafetensorError)  # what a full disk or an unwritable folder raises while a file is written


def _one_line(err: BaseException) -> str:
    text = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    if isinstance(err, SafetensorError):  # e.g. "Error while serializing: I/O error: No space left on device (os ...)"
        text = text.rsplit("I/O error: ", 1)[-1]
    return " ".join(text.split()) or type(err).__name__


def error_text(err: BaseException) -> str:
    """One line saying why a write failed (for `cannot write X: <this>`)."""
    return _one_line(err)


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder` (before renaming the folder into place)."""
    for root, _, files in os.walk(folder):
        for name in files:
            fsync_file(Path(root) / name)
        fsync_dir(Path(root))


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Run `write(tmp)` to fill a temporary file beside `path`, fsync it, and rename it to `path`.

    The temporary name keeps `path`'s suffix, so writers that infer a format from it (matplotlib) still work.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except WRITE_ERRORS as err:
        tmp.unlink(missing_ok=True)
        raise FreeVLMError(f"cannot write {path}: {_one_line(err)}") from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj: Any, **dumps_kwargs: Any) -> Path:
    dumps_kwargs.setdefault("indent", 2)
    return write_text(path, json.dumps(obj, **dumps_kwargs))


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux `renameat2(RENAME_EXCHANGE)`); False where that is not available (another
    OS, an old libc, a file system without it), and the caller falls back to two renames."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: not supported here
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_folder(tmp: Path, final: Path) -> None:
    """Put the finished folder `tmp` at `final` (a sibling). Where the OS can, the two are swapped in one atomic
    step and the old version (now at `tmp`) deleted; elsewhere an existing `final` is moved aside first and deleted
    only once the new one is in place. Either way one complete version exists on disk at every moment (in the
    fallback, for an instant, under the aside name)."""
    fsync_tree(tmp)
    if final.exists() and exchange(tmp, final):
        fsync_dir(final.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_dir(final.parent)


# --- several result files replaced as one unit ---------------------------------------------------------------------

JOURNAL = ".freevlm-commit.json"
STAGING_PREFIX = ".staging-"


@contextlib.contextmanager
def staged_results(out: str | Path) -> Iterator[Path]:
    """A staging folder inside `out` for the body to write a command's result files into; when the body finishes,
    the files replace `out`'s as one unit (`commit_staged`). A failure or kill before that leaves `out`'s results as
    they were (the staging folder is removed, or, after a kill, by the next claim of `out`)."""
    out = Path(out)
    stage = out / f"{STAGING_PREFIX}{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    commit_staged(stage, out)


def commit_staged(stage: Path, out: Path) -> None:
    """Move every file of the complete staging folder over `out`'s: a journal naming them is written (atomically)
    first, so a kill in the middle of the renames is rolled forward by `finish_commit` (the next claim of `out`)."""
    fsync_tree(stage)
    write_json(out / JOURNAL, {"staging": stage.name, "files": sorted(p.name for p in stage.iterdir())})
    finish_commit(out)


def finish_commit(out: Path) -> None:
    """Complete a commit a killed run left half done (its journal says the staging folder was whole), and remove
    staging folders that never reached a commit. Idempotent; called under `out`'s lock."""
    journal = out / JOURNAL
    if journal.is_file():
        record = json.loads(journal.read_text())
        stage = out / record["staging"]
        for name in record["files"]:
            if (stage / name).exists():
                os.replace(stage / name, out / name)
        fsync_dir(out)
        journal.unlink()
    for stale in out.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


# --- claiming an output location ----------------------------------------------------------------------------------


def is_main_process() -> bool:
    """Rank 0 (or not distributed), read from the launcher's environment: checked before any work, so without
    initialising accelerate's state."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def check_writable(folder: str | Path) -> Path:
    """Create `folder` (and its parents) if needed and prove files can be created in it."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FreeVLMError(f"cannot write to {folder}: it is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".freevlm-probe-"):
            pass
    except OSError as err:
        raise FreeVLMError(f"cannot write to {folder}: {_one_line(err)}") from err
    return folder


class OutputLock:
    """An exclusive lock on one output location, held by this process (see the module docstring)."""

    def __init__(self, path: Path, target: Path):
        self.path, self.target = path, target
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        if fcntl is None:  # pragma: no cover
            return self._acquire_exclusive_create()
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise FreeVLMError(f"cannot create lock file {self.path}: {_one_line(err)}") from err
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 64).decode(errors="replace").split()
                os.close(fd)
                pid = holder[0] if holder else "unknown"
                raise FreeVLMError(f"{self.target} is in use by another freevlm run (PID {pid}, lock file "
                                   f"{self.path}); wait for it to finish or choose another --out") from None
            # The holder may have deleted the file between our open and our lock; then we hold a lock on a file
            # nobody else can see. Only a lock on the file currently at the path counts.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = os.read(fd, 64).decode(errors="replace").split()
        if previous and previous[0] != str(os.getpid()):
            print(f"note: taking over the lock on {self.target} left by PID {previous[0]}, which no longer holds it",
                  file=sys.stderr)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def _acquire_exclusive_create(self) -> OutputLock:  # pragma: no cover - non-POSIX fallback
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise FreeVLMError(f"{self.target} is in use by another freevlm run (lock file {self.path}); if no run "
                               "is using it, delete the lock file") from None
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        # Unlink while still holding the lock, so nobody can lock the old file after we let go (see acquire).
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def existing_results(out: Path, results: Sequence[str]) -> list[str]:
    return [name for name in results if (out / name).exists()]


@contextlib.contextmanager
def claim_output(out: str | Path, *, results: Sequence[str] = (), overwrite: bool = False, file: bool = False,
                 main: bool | None = None) -> Iterator[Path]:
    """Check and lock `out` for one run; the body does the work and writes the results (atomically).

    file=True: `out` is one result file (refused if it exists, unless `overwrite`); its folder must be writable.
    file=False: `out` is a folder, created if needed; `results` names the entries inside it that are results (any
    of them present -> refused unless `overwrite`). Other ranks of a distributed run (`main` False) only check.
    With `overwrite` the old results stay in place until the new ones replace them, so a failed run loses nothing.
    """
    out = Path(out)
    main = is_main_process() if main is None else main
    if file and out.is_dir():
        raise FreeVLMError(f"--out {out} is a folder; give a file name for the results (e.g. {out / 'r.json'})")
    if not file and out.exists() and not out.is_dir():
        raise FreeVLMError(f"--out {out} is a file; give a folder for the results")

    def refuse_held() -> None:
        held = ([out.name] if out.exists() else []) if file else existing_results(out, results)
        if held and not overwrite:
            raise FreeVLMError(f"{out} already holds results ({', '.join(held)}); pass --overwrite to replace them "
                               "or choose another --out")

    if not main:
        refuse_held()
        yield out
        return
    folder, lock_path = (out.parent, out.parent / f".{out.name}.lock") if file else (out, out / LOCK_NAME)
    check_writable(folder)
    with OutputLock(lock_path, out):
        if not file:
            finish_commit(out)  # a run killed while committing staged results: roll it forward first
        refuse_held()  # under the lock: a run that finished a moment ago has written its results by now
        yield out
