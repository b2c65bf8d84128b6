"""Export the shapes world to disk in the two formats lcmkit's training commands read.

* ``imagefolder``: ``KEY.png`` files plus ``metadata.jsonl``, one JSON object per line with ``file_name``
  (relative to the folder) and ``text`` (the caption): the Hugging Face ``imagefolder`` convention. Each line
  also carries ``attributes`` (the :class:`~lcmkit_world.world.ShapeSpec` as a dict, style included).
* ``webdataset``: tar shards ``shard-000000.tar``, ``shard-000001.tar``, ... of ``shard_size`` samples, each
  sample stored as ``KEY.png`` + ``KEY.txt`` (the WebDataset convention: files sharing a key up to the first
  dot form one sample).

Keys are the zero-padded image index (``000000``, ``000001``, ...). Image ``i`` is ``world.sample``'s image
``i`` for the seed, so an export is deterministic: the same seed gives the same PNG bytes and, with fixed
tar headers (mtime 0, uid/gid 0), the same shard bytes.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

from PIL import Image

from lcmkit.errors import LcmkitError
from lcmkit_world import world

FORMATS = ("imagefolder", "webdataset")
METADATA_FILE = "metadata.jsonl"
SHARD_PATTERN = "shard-{:06d}.tar"
_RENDER_CHUNK = 256  # images rendered per world.sample call

# files a previous export may have left behind; ``overwrite=True`` removes exactly these
_OWN_FILES = re.compile(r"^(\d+\.png|metadata\.jsonl|shard-\d{6}\.tar)$")


def key_width(n: int) -> int:
    """Digits in a key: at least 6, more when ``n`` needs them."""
    return max(6, len(str(max(n - 1, 0))))


def png_bytes(image) -> bytes:
    """Lossless PNG encoding of a ``(H, W, 3)`` uint8 array."""
    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Create ``out_dir``; refuse a non-empty one unless ``overwrite``, which deletes earlier export files only."""
    if out_dir.exists() and not out_dir.is_dir():
        raise LcmkitError(f"{out_dir} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = list(out_dir.iterdir())
    if existing and not overwrite:
        raise LcmkitError(f"output folder {out_dir} is not empty ({len(existing)} entries); "
                          "choose an empty folder or pass --overwrite")
    for p in existing:  # other files are left alone: --overwrite never deletes what lcmkit did not write
        if p.is_file() and _OWN_FILES.match(p.name):
            p.unlink()


def _iter_world(n: int, seed: int, style: str, captions: str = "exact"):
    """Yield ``(index, image, spec, caption)`` for images ``0 .. n-1`` of the world set ``seed``, rendered in chunks;
    ``captions="open"`` names the shape and a random subset of the rest (:func:`world.sample_named`)."""
    for start in range(0, n, _RENDER_CHUNK):
        images, specs = world.sample(min(_RENDER_CHUNK, n - start), seed=seed, style=style, start=start)
        for j, (image, spec) in enumerate(zip(images, specs)):
            i = start + j
            yield i, image, spec, world.caption(spec, world.sample_named(seed, i) if captions == "open" else None)


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add one file with fixed metadata, so the shard bytes depend only on the content."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def export_world(out_dir, n: int, style: str = "filled", fmt: str = "imagefolder", seed: int = 0,
                 shard_size: int = 1000, overwrite: bool = False, progress: bool = False,
                 captions: str = "exact") -> Path:
    """Render ``n`` world images with ``seed`` and write them to ``out_dir`` as ``fmt``; returns ``out_dir``.

    ``fmt`` is ``"imagefolder"`` or ``"webdataset"`` (see the module docstring). A non-empty ``out_dir`` is
    refused unless ``overwrite``; then the files of an earlier export (``*.png`` keys, ``metadata.jsonl``,
    ``shard-*.tar``) are deleted first and anything else is kept.
    """
    if fmt not in FORMATS:
        raise LcmkitError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if style not in world.STYLES:
        raise LcmkitError(f"unknown style {style!r}; expected one of {', '.join(world.STYLES)}")
    if captions not in world.CAPTION_SETS:
        raise LcmkitError(f"unknown captions {captions!r}; expected exact or open")
    if n < 1:
        raise LcmkitError(f"--n must be at least 1, got {n}")
    if shard_size < 1:
        raise LcmkitError(f"shard size must be at least 1, got {shard_size}")
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir, overwrite)
    items = _iter_world(n, seed, style, captions)
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, total=n, desc=f"export {fmt}")
    width = key_width(n)
    if fmt == "imagefolder":
        _write_imagefolder(out_dir, items, width)
    else:
        _write_webdataset(out_dir, items, width, shard_size)
    return out_dir


def _write_imagefolder(out_dir: Path, items, width: int) -> None:
    with open(out_dir / METADATA_FILE, "w", encoding="utf-8") as meta:
        for i, image, spec, caption in items:
            name = f"{i:0{width}d}.png"
            (out_dir / name).write_bytes(png_bytes(image))
            record = {"file_name": name, "text": caption, "attributes": spec.to_dict()}
            meta.write(json.dumps(record) + "\n")


def _write_webdataset(out_dir: Path, items, width: int, shard_size: int) -> None:
    tar = None
    try:
        for i, image, _, caption in items:
            if i % shard_size == 0:
                if tar is not None:
                    tar.close()
                tar = tarfile.open(out_dir / SHARD_PATTERN.format(i // shard_size), "w", format=tarfile.USTAR_FORMAT)
            key = f"{i:0{width}d}"
            _tar_add(tar, f"{key}.png", png_bytes(image))
            _tar_add(tar, f"{key}.txt", caption.encode("utf-8"))
    finally:
        if tar is not None:
            tar.close()
