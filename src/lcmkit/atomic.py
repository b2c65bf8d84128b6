"""Atomic writes: a file or a folder is either the old one or the new one, never half written.

lcmkit's checkpoints, results, configs, grids and caches are written through these functions. The new content is written beside its final place under a hidden temporary name that keeps the suffix
(``.tmp-<name>``, so writers that pick a format from the suffix still work), flushed to disk, then moved over the
final name with ``os.replace``, which POSIX makes atomic within one file system.
"""

from __future__ import annotations

import json
import os
import shutil
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


def temp_path(path: str | os.PathLike) -> Path:
    """The temporary name :func:`atomic_write` uses beside ``path``: hidden, same suffix."""
    path = Path(path)
    return path.with_name(f".tmp-{path.name}")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` for a temporary file beside ``path``, fsync it, then ``os.replace`` it onto ``path``.

    If ``write`` fails, the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
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
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".tmp-{final.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        write(tmp)
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
