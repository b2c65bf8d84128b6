"""The run folder (``--out``) of a training run: one run at a time, an ``--overwrite`` that loses nothing, and no
output path that is a dangling link.

- **Lock**: ``<out>/.lcmkit-lock``, held with ``fcntl.flock`` for the whole run; a second run into the folder is
  refused at once, naming the holder (pid, host, command) that the file records. flock, not O_EXCL + a pid check:
  the kernel drops a flock when its holder dies, even by SIGKILL, so a killed run never leaves a lock behind that
  blocks the next one, and no pid can be mistaken for a live one after reuse. Where a file system has no flock, the
  pid check is the fallback (a dead pid on this host is taken over).
- **--overwrite**: the old run's files (checkpoints, results, ``config.yaml``, ``logs/``, grids) are moved aside
  into ``<out>/.lcmkit-replaced/`` (a rename: instant, nothing copied) and deleted only once the new run has
  produced something to replace them with: its first checkpoint or its result. A run that fails before that puts
  them back: the CLI at once (:func:`abandon_all`), a library caller at exit, and after a SIGKILL the next start
  into the folder. Only what lcmkit itself wrote is ever moved: a folder of the user's with one of those names is
  refused, never deleted.
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Iterable

from ..errors import LcmkitError

LOCK_FILE = ".lcmkit-lock"
REPLACED_DIR = ".lcmkit-replaced"
LOGS_DIR = "logs"
#: what a failed --overwrite run may have written before its first checkpoint; put back over by the old run's files
DISCARDABLE = ("config.yaml", LOGS_DIR, "validation", "summary.json")

_LOCKS: dict[str, "RunLock"] = {}          # folder (resolved) → the lock this process holds on it
_PENDING: dict[str, tuple[Path, tuple[str, ...]]] = {}  # folder → (folder, its result names): files moved aside


# --------------------------------------------------------------------------------------------------------------
# output paths
# --------------------------------------------------------------------------------------------------------------

def check_output_path(path: str | os.PathLike, what: str = "output") -> Path:
    """Refuse an output path that is a dangling link (writing through it would create its target elsewhere)."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise LcmkitError(f"{what} {path} is a link to {os.readlink(path)}, which does not exist; lcmkit does not "
                          "create a link's target: pass a real path")
    return path


# --------------------------------------------------------------------------------------------------------------
# the lock
# --------------------------------------------------------------------------------------------------------------

class RunLock:
    """A held lock on a run folder; :meth:`release` (idempotent) unlinks the file and drops the lock."""

    def __init__(self, folder: Path, fd: int | None):
        self.folder, self.fd = folder, fd
        self.path = folder / LOCK_FILE

    def release(self) -> None:
        if self.fd is None and self.path is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it: a waiter on the old file retries on the path
        except OSError:
            pass
        if self.fd is not None:
            os.close(self.fd)
        self.fd, self.path = None, None
        _LOCKS.pop(_key(self.folder), None)


def _key(folder: Path) -> str:
    return str(Path(folder).resolve())


def _holder_text(raw: bytes) -> str:
    try:
        h = json.loads(raw.decode())
        return f"{h.get('command', 'lcmkit')}, pid {h['pid']} on {h['host']}, since {h.get('started', '?')}"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "a process that left no details"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _busy(folder: Path, holder: str) -> LcmkitError:
    return LcmkitError(f"output folder {folder} is in use by another run ({holder}); wait for it to finish or stop "
                       "it, or choose another --out")


def acquire_lock(folder: str | os.PathLike, command: str = "lcmkit") -> RunLock:
    """Lock ``folder`` (which exists) for this process, or refuse at once, naming the run that holds it."""
    import fcntl

    folder = Path(folder)
    held = _LOCKS.pop(_key(folder), None)
    if held is not None:  # a run of this process that ended by an exception: runs in one process are sequential
        held.release()
    path = folder / LOCK_FILE
    me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                     "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_text(os.pread(fd, 4096, 0))
            os.close(fd)
            raise _busy(folder, holder) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            _pid_check(folder, os.pread(fd, 4096, 0))  # no flock here: a live pid on this host (or another) holds it
        try:  # the holder may have released (and unlinked) the file just before we locked it: lock the one at path
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, me, 0)
    lock = _LOCKS[_key(folder)] = RunLock(folder, fd)
    return lock


def _pid_check(folder: Path, raw: bytes) -> None:
    """The fallback where flock is missing: refuse a lock file whose pid is alive on this host, or on another."""
    try:
        h = json.loads(raw.decode())
        pid, host = int(h["pid"]), str(h["host"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return  # empty or unreadable: nobody holds it
    if pid == os.getpid():
        return
    if host != socket.gethostname() or _pid_alive(pid):
        raise _busy(folder, _holder_text(raw) + (f"; delete {folder / LOCK_FILE} if that run is gone"
                                                 if host != socket.gethostname() else ""))


# --------------------------------------------------------------------------------------------------------------
# --overwrite: move aside, then commit or restore
# --------------------------------------------------------------------------------------------------------------

def _is_lcmkit_config(path: Path) -> bool:
    """Whether ``path`` is a config.yaml lcmkit's ``save_config`` wrote (a mapping with an ``optim`` section)."""
    import yaml

    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > (1 << 20):
            return False
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and isinstance(data.get("optim"), dict)


_PATTERNS = {"checkpoints": r"step-\d+", "validation": r"step-\d+\.png",
             LOGS_DIR: r"log\.jsonl|loss\.png|resumes\.jsonl|events\.out\.tfevents\..*"}


def foreign_reason(folder: Path, name: str) -> str | None:
    """Why ``folder/name`` is not something lcmkit wrote (so --overwrite must not replace it); None if it is."""
    entry = folder / name
    if entry.is_symlink():
        return "it is a link, and lcmkit writes none"
    if not _is_lcmkit_config(folder / "config.yaml"):
        return "the folder has no config.yaml of an lcmkit run"
    if name in _PATTERNS:
        if not entry.is_dir():
            return "it is not a folder"
        for child in entry.iterdir():
            if not (child.name.startswith(".tmp-") or re.fullmatch(_PATTERNS[name], child.name)):
                return f"{name}/{child.name} is not one of lcmkit's files"
    elif name in ("lora", "pipeline") and not (entry / "config.yaml").is_file():
        return "it holds no config.yaml of an lcmkit result"
    elif name == "summary.json":
        try:
            summary = json.loads(entry.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            summary = None
        if not (isinstance(summary, dict) and "max_steps" in summary and "finished" in summary):
            return "it is not an lcmkit run summary"
    return None


def move_aside(folder: Path, result_names: Iterable[str]) -> list[str]:
    """--overwrite: move the old run's files (``result_names`` present, and its config.yaml and logs) into
    ``.lcmkit-replaced/``; refuse, before moving anything, when one of them is not lcmkit's. Returns what moved."""
    names = [n for n in dict.fromkeys([*result_names, *DISCARDABLE]) if os.path.lexists(folder / n)]
    for n in names:
        why = foreign_reason(folder, n)
        if why is not None and (n in result_names or n == "validation"):
            raise LcmkitError(f"--overwrite replaces only what lcmkit wrote, and {folder / n} is not one of its "
                              f"results ({why}); move it out of the way or choose another --out")
    moved = [n for n in names if n in result_names or foreign_reason(folder, n) is None]
    aside = folder / REPLACED_DIR
    aside.mkdir()
    for n in moved:
        os.rename(folder / n, aside / n)
    _PENDING[_key(folder)] = (folder, tuple(result_names))
    return moved


def commit(folder: Path) -> None:
    """The new run has produced something: delete the old run's files for good."""
    _PENDING.pop(_key(folder), None)
    aside = folder / REPLACED_DIR
    if aside.exists():
        done = folder / f"{REPLACED_DIR}-done"
        shutil.rmtree(done, ignore_errors=True)
        os.rename(aside, done)  # one rename: a kill during the delete below cannot bring half of them back
        shutil.rmtree(done, ignore_errors=True)


def restore(folder: Path, result_names: Iterable[str]) -> bool:
    """Put back what :func:`move_aside` moved when the new run produced nothing (no checkpoint, no result);
    returns whether anything came back. A new run that did produce something keeps it (:func:`commit`)."""
    _PENDING.pop(_key(folder), None)
    shutil.rmtree(folder / f"{REPLACED_DIR}-done", ignore_errors=True)
    aside = folder / REPLACED_DIR
    if not aside.is_dir():
        return False
    produced = [n for n in result_names if n not in DISCARDABLE and os.path.lexists(folder / n)]
    if produced:
        commit(folder)
        return False
    for entry in sorted(aside.iterdir()):
        current = folder / entry.name
        if current.is_dir() and not current.is_symlink():
            shutil.rmtree(current)
        elif os.path.lexists(current):
            current.unlink()
        os.rename(entry, current)
    aside.rmdir()
    return True


def release(folder: str | os.PathLike) -> None:
    """A run into ``folder`` has finished: drop its lock (no-op when this process holds none)."""
    lock = _LOCKS.get(_key(Path(folder)))
    if lock is not None:
        lock.release()


def abandon_all() -> None:
    """Every run of this process that has not finished: put back what its --overwrite moved, drop its lock (what
    the CLI does after a failed run, and what happens at exit)."""
    for folder, names in list(_PENDING.values()):
        try:
            restore(folder, names)
        except OSError:
            pass
    for lock in list(_LOCKS.values()):
        lock.release()


atexit.register(abandon_all)
