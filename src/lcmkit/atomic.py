"""Atomic writes: a file or a folder is either the old one or the new one, never half written.

lcmkit's checkpoints, results, configs, grids and caches are written through these functions. The new content is written beside its final place under a hidden temporary name that keeps the suffix
(``.tmp-<name>``, so writers that pick a format from the suffix still work), flushed to disk, then moved over the
final name with ``os.replace``, which POSIX makes atomic within one file system.

What they write gets the mode a plain ``open()`` / ``mkdir()`` would give it under the process umask (files
``0666 & ~umask``, folders ``0777 & ~umask``: 0644 / 0755 under the usual 022), set before the rename: safetensors
creates its files ``0600`` and ``tempfile.mkdtemp`` its folders ``0700``, which another user (a ComfyUI server, a
shared cluster's evaluation job) could not read. Privacy is the umask's to decide (``umask 077``), as for every other
file of a run.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Callable


def _fsync_dir(path: Path) -> None:
    """Flush a folder's entries (the rename itself) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in [path, *sorted(x for x in path.rglob("*") if x.is_dir())]:
        _fsync_dir(d)


def current_umask() -> int:
    """The process umask, read without changing it where the kernel reports it (Linux >= 4.7, /proc/self/status);
    elsewhere set and restored at once (``os.umask`` has no read-only form)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_readable(path: str | os.PathLike, mask: int | None = None) -> None:
    """Give ``path`` the mode a new file (0666; 0777 if it has an execute bit) or folder (0777) gets under the
    umask (``mask``, default the process's); links are left alone, and so is a file system that refuses chmod."""
    path = Path(path)
    mask = current_umask() if mask is None else mask
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return
    full = 0o777 if stat.S_ISDIR(st.st_mode) or st.st_mode & 0o111 else 0o666
    try:
        os.chmod(path, full & ~mask)
    except OSError:  # a file system that keeps no Unix modes (vfat, some network shares): its own rules apply
        pass


def make_tree_readable(folder: str | os.PathLike) -> None:
    """:func:`make_readable` on ``folder`` and everything inside it (links not followed)."""
    mask = current_umask()
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            make_readable(Path(root) / name, mask)
    make_readable(folder, mask)


def temp_path(path: str | os.PathLike) -> Path:
    """The temporary name :func:`atomic_write` uses beside ``path``: hidden, same suffix."""
    path = Path(path)
    return path.with_name(f".tmp-{path.name}")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` for a temporary file beside ``path``, fsync it, then ``os.replace`` it onto ``path``.

    If ``write`` fails, the temporary file is removed and ``path`` is untouched. The file gets the umask's mode
    (module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        make_readable(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``text`` (UTF-8) at ``path``, atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, data, indent: int = 1, default=None) -> Path:
    """``data`` as indented JSON at ``path``, atomically (``default``: as for ``json.dumps``)."""
    return write_text(path, json.dumps(data, indent=indent, default=default) + "\n")


def atomic_folder(final: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a fresh temporary folder beside ``final``, fsync it, then ``os.replace`` it onto
    ``final``.

    A crash leaves either the old ``final`` or the new one, never a half-written folder (a leftover ``.tmp-*``
    folder is ignored and cleaned up next time). An existing ``final`` is moved aside first and deleted after.
    The folder and everything in it get the umask's modes (module docstring).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".tmp-{final.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        write(tmp)
        make_tree_readable(tmp)
        _fsync_tree(tmp)
        old = None
        if final.exists():
            old = final.parent / f".tmp-{final.name}-old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
