"""What lcmkit reads from a user: regular files of a bounded size, and text that is text. Importable without torch.

**Files.** A path a user hands over (an image of an imagefolder, a webdataset shard, ``--init-image``) may name a
FIFO (reading it waits forever for a writer), a device (``/dev/zero`` never ends), a socket, or a sparse file that
claims gigabytes. :func:`open_regular` opens regular files only: it stats the path (following symlinks, so a link
is judged by its target), opens it non-blocking and checks the opened descriptor again (``fstat``), so a file
swapped for a FIFO between the check and the open cannot hang the read either. A size cap refuses what is too
big to be what it claims before a byte is read:

- :data:`MAX_IMAGE_BYTES` (64 MiB): a 4096² photograph is ~5 MiB as JPEG and ~30 MiB as PNG; 64 MiB leaves room
  for 8K PNGs, while an image file is read whole into memory and then decoded (Pillow's decompression-bomb limit
  bounds the decoded pixels separately).
- :data:`MAX_SHARD_BYTES` (64 GiB): a shard is indexed by its tar headers and each sample read as a byte range,
  never the whole shard, so memory does not grow with its size; WebDataset shards are typically 0.1–10 GB, and
  the cap only refuses what is no shard (a disk image, a sparse file).
- :data:`MAX_CAPTION_BYTES` (64 KiB) for a caption file, :data:`MAX_METADATA_LINE_BYTES` (1 MiB) for a line of
  ``metadata.jsonl``: CLIP reads 77 tokens, a few hundred bytes.

**Text.** Python hands over undecodable command-line bytes as lone surrogates (``\\udcff`` for byte 0xff,
PEP 383), and JSON may spell one outright (``"\\ud800"``); such a string cannot be encoded as UTF-8, so a tokenizer
(or any file write) fails on it. :func:`text_problem` says why a string is not text.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import LcmkitError

MAX_IMAGE_BYTES = 64 * 2**20
MAX_SHARD_BYTES = 64 * 2**30
MAX_CAPTION_BYTES = 64 * 2**10
MAX_METADATA_LINE_BYTES = 2**20


class NotReadable(Exception):
    """A path that is not read: ``reason`` is ``missing``, ``not_a_file`` or ``too_large``."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _check(path, st: os.stat_result, max_bytes: int | None) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise NotReadable("not_a_file", f"{path} is {_kind(st.st_mode)}, not a regular file")
    if max_bytes is not None and st.st_size > max_bytes:
        raise NotReadable("too_large", f"{path} holds {st.st_size:,} bytes, more than the {max_bytes:,} allowed")


def open_regular(path: str | os.PathLike, max_bytes: int | None = None):
    """``path`` opened for binary reading if it is a regular file of at most ``max_bytes``; raises
    :class:`NotReadable` otherwise (never blocks, never reads)."""
    try:
        _check(path, os.stat(path), max_bytes)  # os.stat follows symlinks: the target is what is read
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as e:
        raise NotReadable("missing", f"{path} does not exist") from e
    except OSError as e:
        raise NotReadable("missing", f"{path} cannot be read: {e.strerror or e}") from e
    except ValueError as e:  # a NUL byte, or a lone surrogate no file name can hold
        raise NotReadable("missing", f"{path!r} is not a valid path ({e})") from e
    try:
        _check(path, os.fstat(fd), max_bytes)  # what was opened, in case the path changed since the stat
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike, max_bytes: int, offset: int | None = None,
                 length: int | None = None) -> bytes:
    """The bytes of the regular file ``path`` (at most ``max_bytes``), or ``length`` bytes at ``offset`` of it
    (a sample inside a shard: then ``length`` is what is capped, not the file)."""
    if offset is None:
        with open_regular(path, max_bytes) as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:  # it grew after the check
            raise NotReadable("too_large", f"{path} holds more than the {max_bytes:,} bytes allowed")
        return data
    if length is None or length > max_bytes:
        raise NotReadable("too_large", f"{length:,} bytes at offset {offset} of {path}, more than the "
                                       f"{max_bytes:,} allowed")
    with open_regular(path) as f:
        f.seek(offset)
        return f.read(length)


def check_user_file(path: str | os.PathLike, what: str, max_bytes: int | None = None) -> Path:
    """A file the user named (``what``: "init image", ...) must be a regular file within the cap: else one line."""
    try:
        with open_regular(path, max_bytes):
            pass
    except NotReadable as e:
        raise LcmkitError(f"{what} {e}" if e.reason != "missing" else f"{what} {path} not found") from e
    return Path(path)


def load_image(image, what: str = "image"):
    """An RGB PIL image from ``image``: a PIL image (converted), None (kept), or a path to a regular file of at
    most :data:`MAX_IMAGE_BYTES` (a FIFO or ``/dev/zero`` named as the image is never read); else one line."""
    import io

    from PIL import Image

    if image is None or isinstance(image, Image.Image):
        return image if image is None or image.mode == "RGB" else image.convert("RGB")
    try:
        data = read_regular(image, MAX_IMAGE_BYTES)
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")
    except NotReadable as e:
        raise LcmkitError(f"{what} {e}" if e.reason != "missing" else f"{what} {image} not found") from e
    except Exception as e:  # PIL raises many types for a file that is no image
        raise LcmkitError(f"{what} {image} could not be read as an image: {type(e).__name__}: {e}") from e


def text_problem(text: str) -> str | None:
    """Why ``text`` is not valid text (a lone surrogate: undecodable bytes or a JSON ``\\ud800``), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        if 0xDC80 <= code <= 0xDCFF:  # PEP 383: a byte that was not UTF-8, kept as a surrogate
            return f"byte 0x{code - 0xDC00:02x} at character {e.start} is not UTF-8"
        return f"it holds a lone surrogate U+{code:04X} at character {e.start}"
    return None


def check_text(name: str, text) -> str:
    """``text`` must be a string of valid text (a prompt, a negative or validation prompt); else one line."""
    if not isinstance(text, str):
        raise LcmkitError(f"{name} must be a string, got {type(text).__name__}")
    problem = text_problem(text)
    if problem:
        raise LcmkitError(f"{name} is not valid text ({problem}); pass it as UTF-8 "
                          "(check the terminal's or the file's encoding)")
    return text
