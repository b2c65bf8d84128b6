"""Image-caption datasets for training: Hugging Face imagefolders and WebDataset tar shards.

Two on-disk formats, read without extra dependencies:

* **imagefolder** (Hugging Face convention): a folder with images and ``metadata.jsonl``, one JSON object per
  line with ``file_name`` (path relative to the folder) and a caption column (``text`` by default).
* **webdataset** (WebDataset convention): uncompressed tar shards in which files sharing a *key* (the member
  name up to the first dot of its base name) form one sample: ``000042.png`` + ``000042.txt``. Shards can be
  given as a file, a folder (all ``*.tar`` in it, sorted), a glob (``data/*.tar``), a brace pattern
  (``data/shard-{000000..000009}.tar``, ``{a,b}``), or a list of those. Each shard's headers are indexed once
  up front (``tarfile``), after which every sample is a byte range: random access, exact shuffling and exact
  resume, as for an imagefolder.

Bad data never crashes a run. Unreadable or truncated images, images smaller than ``min_size``, missing or
empty captions, captions that are not text (invalid UTF-8, a JSON ``"\\ud800"``), unusable metadata lines, and
empty or truncated shards are skipped and counted by reason in ``dataset.skipped`` (a ``Counter``). Only regular
files are read (a FIFO, a device or a socket named like an image or a shard is skipped, never opened for a
blocking read), each under a size cap (:mod:`lcmkit.inputs`: 64 MiB an image, 64 GiB a shard, 64 KiB a
caption). Non-RGB images (L, LA, P, RGBA, CMYK, ...) are converted to RGB (alpha composited over white) and
counted in ``dataset.converted``. Once the bad fraction of the samples seen so far
exceeds ``max_bad_fraction`` (checked after ``min_checked`` samples, and at the end of every pass), an
:class:`~lcmkit.errors.LcmkitError` stops the run with the counts.

Randomness is always passed in: :meth:`ImageTextDataset.iterate` takes a ``torch.Generator`` that decides the
order of the pass and (through a seed drawn from it) every random crop and flip; sample ``p`` of a pass
depends only on the generator's seed and ``p``, so resuming with ``skip=p`` continues exactly.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import tarfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lcmkit.errors import LcmkitError
from lcmkit.inputs import (
    MAX_CAPTION_BYTES,
    MAX_IMAGE_BYTES,
    MAX_METADATA_LINE_BYTES,
    MAX_SHARD_BYTES,
    NotReadable,
    open_regular,
    read_regular,
    text_problem,
)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp")  # preference order when a key has several
CAPTION_EXTENSIONS = ("txt", "caption", "text")
METADATA_FILE = "metadata.jsonl"

#: Reasons a sample is skipped (counted per sample; these make up the bad fraction).
SAMPLE_REASONS = ("corrupt_image", "missing_image", "too_small", "missing_caption", "empty_caption",
                  "bad_caption", "bad_metadata", "path_outside_dataset", "not_a_file", "too_large")
#: Reasons a whole shard contributes nothing or less than it should (counted per shard).
SHARD_REASONS = ("empty_shard", "corrupt_shard", "truncated_shard", "not_a_file_shard", "oversized_shard")


class BadSample(Exception):
    """A sample that cannot be used; ``reason`` is one of :data:`SAMPLE_REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# --- path patterns -----------------------------------------------------------------------------------------
def _matching_brace(s: str, start: int) -> int:
    """Index of the ``}`` closing the ``{`` at ``start``; -1 when unbalanced."""
    depth = 0
    for i in range(start, len(s)):
        depth += {"{": 1, "}": -1}.get(s[i], 0)
        if depth == 0:
            return i
    return -1


def _split_top_level(s: str, sep: str = ",") -> list[str]:
    """Split ``s`` on ``sep`` outside nested braces."""
    parts, depth, cur = [], 0, []
    for ch in s:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    return parts + ["".join(cur)]


def _expand_range(body: str) -> list[str] | None:
    """``a..b`` (or ``a..b..step``) of integers -> the numbers; zero-padded when an end has a leading zero."""
    m = re.fullmatch(r"(-?\d+)\.\.(-?\d+)(?:\.\.(\d+))?", body)
    if not m:
        return None
    a, b, step = int(m[1]), int(m[2]), int(m[3] or 1)
    if step == 0:
        raise LcmkitError(f"brace range {{{body}}} has step 0")
    padded = any(len(x.lstrip("-")) > 1 and x.lstrip("-").startswith("0") for x in (m[1], m[2]))
    width = max(len(m[1]), len(m[2])) if padded else 0
    values = range(a, b + 1, step) if a <= b else range(a, b - 1, -step)
    return [f"{v:0{width}d}" for v in values]


def expand_braces(pattern: str) -> list[str]:
    """Bash/WebDataset-style brace expansion, in order: ``s-{00..02}.tar`` -> ``s-00.tar s-01.tar s-02.tar``.

    Supports integer ranges ``{a..b}`` and ``{a..b..step}`` (zero-padded to the wider end when either end has
    a leading zero), comma lists ``{x,y}``, nesting, and several groups (cartesian product, left to right).
    A ``{...}`` with neither a range nor a comma is kept literally, as bash does.
    """
    start = pattern.find("{")
    while start != -1:
        end = _matching_brace(pattern, start)
        if end == -1:
            raise LcmkitError(f"unbalanced braces in {pattern!r}")
        body = pattern[start + 1:end]
        options = _expand_range(body)
        if options is None:
            parts = _split_top_level(body)
            options = [x for part in parts for x in expand_braces(part)] if len(parts) > 1 else None
        if options is not None:
            return [pre + opt + rest for pre in [pattern[:start]] for opt in options
                    for rest in expand_braces(pattern[end + 1:])]
        start = pattern.find("{", end + 1)  # literal group: look further right
    return [pattern]


def resolve_shards(spec) -> list[Path]:
    """Shard files from a file, folder, glob, brace pattern, or a list of those (order kept, duplicates dropped).

    A brace pattern that names a missing file is an error (most likely a typo in the range).
    """
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    out: list[Path] = []
    for s in map(str, specs):
        for item in expand_braces(s):
            p = Path(item)
            if p.is_dir():
                found = sorted(p.glob("*.tar"))
                if not found:
                    raise LcmkitError(f"no .tar shards in folder {p}")
                out += found
            elif glob.has_magic(item):
                found = sorted(Path(x) for x in glob.glob(item))
                if not found:
                    raise LcmkitError(f"no files match {item!r}")
                out += found
            elif p.exists():  # a FIFO or device named as a shard is counted by index_shard, never read
                out.append(p)
            else:
                raise LcmkitError(f"shard {p} does not exist" + (f" (from pattern {s!r})" if item != s else ""))
    return list(dict.fromkeys(out))


# --- images and transforms ---------------------------------------------------------------------------------
def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparency (RGBA, LA, P with a transparent index) is composited over white."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):  # high bit depth: scale to 8 bits first
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 / 65535.0 if arr.max() > 255 else 1.0
        img = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


def decode_image(data: bytes, min_size: int = 0) -> tuple[Image.Image, str]:
    """Decode image bytes fully; returns ``(RGB image, original mode)``. Raises :class:`BadSample`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on odd metadata; the decode below is what counts
            with Image.open(io.BytesIO(data)) as img:
                if min(img.size) < min_size:
                    raise BadSample("too_small", f"{img.size[0]}x{img.size[1]} < {min_size}")
                img.load()  # forces a full decode: truncated files fail here, not later
                mode = img.mode
                rgb = to_rgb(img)
                if rgb is img:
                    rgb = img.copy()
    except BadSample:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise BadSample("corrupt_image", f"{type(e).__name__}: {e}") from e
    return rgb, mode


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size`` (bicubic, antialiased by PIL); unchanged if it already is."""
    w, h = img.size
    if min(w, h) == size:
        return img
    scale = size / min(w, h)
    return img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)


def crop_box(width: int, height: int, size: int, rng: np.random.Generator | None) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of a ``size`` square: centred when ``rng`` is None, else uniform."""
    if rng is None:
        left, top = (width - size) // 2, (height - size) // 2
    else:
        left, top = int(rng.integers(width - size + 1)), int(rng.integers(height - size + 1))
    return left, top, left + size, top + size


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 ``(3, H, W)`` in [-1, 1] (``x / 127.5 - 1``)."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class ImageTransform:
    """Resize the shorter side to ``resolution``, crop a square, optionally flip, convert to [-1, 1] tensor.

    ``crop``: ``"center"`` or ``"random"``. ``flip`` (horizontal, probability 0.5) is **off by default**:
    captions often name left/right (the shapes world has "top left", "bottom right", ...), and a flip would
    make such captions wrong. Turn it on only for data whose captions are mirror-invariant.
    """

    resolution: int = 32
    crop: str = "center"
    flip: bool = False

    def __post_init__(self):
        if self.crop not in ("center", "random"):
            raise LcmkitError(f"crop must be 'center' or 'random', got {self.crop!r}")
        if self.resolution < 1:
            raise LcmkitError(f"resolution must be positive, got {self.resolution}")

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        img = resize_shorter_side(img, self.resolution)
        box = crop_box(*img.size, self.resolution, rng if self.crop == "random" else None)
        if box != (0, 0, *img.size):
            img = img.crop(box)
        if self.flip and rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor(img)


# --- records: where each sample lives ----------------------------------------------------------------------
@dataclass(frozen=True)
class Record:
    """One sample's location. ``path`` is an image file, or a shard when ``offset`` is set (then ``size``
    bytes at ``offset``). ``caption`` is None when missing; ``problem`` names a defect found while indexing."""

    key: str
    path: Path | None
    caption: str | None
    offset: int | None = None
    size: int | None = None
    problem: str | None = None

    def read_image_bytes(self) -> bytes:
        """The image's bytes: a regular file of at most ``MAX_IMAGE_BYTES`` (or that many bytes of a shard)."""
        if self.path is None:
            raise BadSample("missing_image", self.key)
        try:
            data = read_regular(self.path, MAX_IMAGE_BYTES, self.offset, self.size)
        except NotReadable as e:
            raise BadSample({"missing": "missing_image"}.get(e.reason, e.reason), str(e)) from e
        except OSError as e:
            raise BadSample("missing_image", f"{self.path}: {e}") from e
        if self.offset is not None and len(data) != self.size:
            raise BadSample("corrupt_image", f"{self.key}: shard ends inside the image")
        return data


def index_imagefolder(root, caption_key: str = "text") -> list[Record]:
    """Records of an imagefolder, in ``metadata.jsonl`` order (defects are recorded, not raised)."""
    root = Path(root)
    meta = root / METADATA_FILE
    if not meta.exists():
        raise LcmkitError(f"{root} has no {METADATA_FILE} (imagefolder format: one JSON object per line with "
                          f"'file_name' and '{caption_key}')")
    try:
        f = open_regular(meta)
    except NotReadable as e:
        raise LcmkitError(f"{e}; {METADATA_FILE} must be a regular file") from e
    records = []
    with f:
        for lineno, raw in _lines(f, MAX_METADATA_LINE_BYTES):
            key = f"{meta.name}:{lineno}"
            try:
                if raw is None:  # a line longer than the cap
                    raise ValueError
                # surrogateescape: bytes that are not UTF-8 survive as lone surrogates (a file name may hold them,
                # POSIX names are bytes; a caption may not: text_problem below)
                row = json.loads(raw.decode("utf-8", errors="surrogateescape"))
                name = row["file_name"]
                if not isinstance(row, dict) or not isinstance(name, str) or not name:
                    raise ValueError
                path = root / name
                inside = not Path(name).is_absolute() and path.resolve().is_relative_to(root.resolve())
            except (ValueError, KeyError, TypeError, RuntimeError, OSError):  # also a NUL, a "\ud800", a link loop
                records.append(Record(key, None, None, problem="bad_metadata"))
                continue
            if not inside:
                # a file_name that leaves the dataset folder (../x, /etc/passwd) is never read
                records.append(Record(name, None, None, problem="path_outside_dataset"))
                continue
            text = row.get(caption_key)
            bad = text is not None and (not isinstance(text, str) or text_problem(text) is not None)
            records.append(Record(name, path, None if bad else text, problem="bad_caption" if bad else None))
    return records


def _lines(f, cap: int):
    """``(line number, bytes)`` of each non-blank line of binary file ``f``; bytes is None for a line longer than
    ``cap`` (read past in chunks, never held whole)."""
    lineno = 0
    while True:
        line = f.readline(cap + 1)
        if not line:
            return
        lineno += 1
        if len(line) > cap and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = f.readline(cap + 1)
            yield lineno, None
        elif line.strip():
            yield lineno, line


def _split_key(name: str) -> tuple[str, str] | None:
    """WebDataset member name -> ``(key, extension)``: split at the first dot of the base name."""
    directory, _, base = name.rpartition("/")
    if not base or base.startswith(".") or "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def index_shard(path: Path, problems: Counter) -> list[Record]:
    """Records of one tar shard, in the order keys first appear. Shard defects go into ``problems``."""
    path = Path(path)
    try:
        f = open_regular(path, MAX_SHARD_BYTES)
    except NotReadable as e:  # a FIFO, a device, a socket, a folder named .tar; or no shard at 64 GiB
        problems[{"too_large": "oversized_shard"}.get(e.reason, "not_a_file_shard")] += 1
        return []
    with f:
        file_size = os.fstat(f.fileno()).st_size
        magic = f.read(3)
        f.seek(0)
        if magic[:2] == b"\x1f\x8b" or magic == b"BZh" or magic[:3] == b"\xfd7z":
            raise LcmkitError(f"{path} is a compressed tar; lcmkit reads uncompressed shards (random access): "
                              "decompress it first (e.g. gunzip)")
        return _index_tar(path, f, file_size, problems)


def _index_tar(path: Path, f, file_size: int, problems: Counter) -> list[Record]:
    samples: dict[str, dict] = {}
    truncated = False
    try:
        with tarfile.open(fileobj=f, mode="r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                split = _split_key(m.name)
                if split is None:
                    continue
                key, ext = split
                entry = samples.setdefault(key, {})
                if m.offset_data + m.size > file_size:  # header promises more bytes than the file has
                    truncated = True
                    continue
                if ext in IMAGE_EXTENSIONS:
                    rank = IMAGE_EXTENSIONS.index(ext)
                    if rank < entry.get("image_rank", len(IMAGE_EXTENSIONS)):
                        entry.update(image=(m.offset_data, m.size), image_rank=rank,
                                     image_problem="too_large" if m.size > MAX_IMAGE_BYTES else None)
                elif ext in CAPTION_EXTENSIONS and "caption" not in entry and "caption_problem" not in entry:
                    if m.size > MAX_CAPTION_BYTES:  # never read: no caption is that long
                        entry["caption_problem"] = "bad_caption"
                        continue
                    try:
                        entry["caption"] = tf.extractfile(m).read().decode("utf-8")
                    except UnicodeDecodeError:  # strict: invalid bytes and encoded surrogates both fail here
                        entry["caption_problem"] = "bad_caption"
            # a complete archive ends with zero blocks; a file cut at a member boundary just stops
            truncated |= file_size - tf.offset < tarfile.BLOCKSIZE
    except (tarfile.TarError, EOFError, OSError):
        if not samples:
            problems["empty_shard" if file_size == 0 else "corrupt_shard"] += 1
            return []
        truncated = True  # keep what was indexed before the damage
    if truncated:
        problems["truncated_shard"] += 1
    if not samples:
        problems["empty_shard"] += 1
    records = []
    for key, e in samples.items():
        offset, size = e.get("image", (None, None))
        problem = e.get("image_problem") or e.get("caption_problem")
        if offset is None and problem is None and "caption" not in e:
            continue  # a key with neither image nor caption (e.g. only .json/.cls): not a sample
        records.append(Record(key, path if offset is not None else None, e.get("caption"), offset, size, problem))
    return records


# --- the dataset -------------------------------------------------------------------------------------------
class ImageTextDataset:
    """Image-caption pairs with skip-and-count handling of bad data (see the module docstring).

    ``transform``: an :class:`ImageTransform` (items are then ``(tensor (3, R, R) in [-1, 1], caption)``) or
    None (items are ``(RGB PIL image, caption)``). ``min_size``: shorter side below which an image is skipped;
    default half the transform's resolution (upscaling smaller images mostly adds blur), 1 without transform.
    """

    def __init__(self, records: list[Record], transform: ImageTransform | None = None, min_size: int | None = None,
                 max_bad_fraction: float = 0.05, min_checked: int = 100, name: str = "dataset",
                 skipped: Counter | None = None):
        if not records:
            raise LcmkitError(f"{name}: no samples found")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise LcmkitError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.records = list(records)
        self.transform = transform
        self.min_size = min_size if min_size is not None else (max(1, transform.resolution // 2) if transform else 1)
        self.max_bad_fraction = max_bad_fraction
        self.min_checked = min_checked
        self.name = name
        self.skipped: Counter = Counter(skipped or {})  # reason -> count (shard reasons are counted at indexing)
        self.converted: Counter = Counter()  # original mode -> count of images converted to RGB
        self.seen = 0  # samples looked at (good + bad), over all passes

    def __len__(self) -> int:
        return len(self.records)

    @property
    def bad(self) -> int:
        """Samples skipped so far (shard-level problems are not samples and do not count here)."""
        return sum(v for k, v in self.skipped.items() if k in SAMPLE_REASONS)

    def load(self, i: int) -> tuple[Image.Image, str]:
        """Sample ``i`` as ``(RGB PIL image, caption)``; raises :class:`BadSample`. Counts nothing."""
        r = self.records[i]
        if r.problem:
            raise BadSample(r.problem, r.key)
        if r.caption is None:
            raise BadSample("missing_caption", r.key)
        caption = r.caption.strip()
        if not caption:
            raise BadSample("empty_caption", r.key)
        img, mode = decode_image(r.read_image_bytes(), self.min_size)
        if mode != "RGB":
            self.converted[mode] += 1
        return img, caption

    def _check_bad_fraction(self, end_of_pass: bool) -> None:
        if self.seen == 0 or (self.seen < self.min_checked and not end_of_pass):
            return
        if self.bad / self.seen > self.max_bad_fraction:
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()))
            raise LcmkitError(f"{self.name}: {self.bad} of {self.seen} samples were unusable ({reasons}), more than "
                              f"max_bad_fraction={self.max_bad_fraction:g}; fix the data or raise max_bad_fraction")

    def order(self, generator: torch.Generator | None) -> list[int]:
        """The order of one pass: a permutation drawn from ``generator``, or the stored order if None."""
        if generator is None:
            return list(range(len(self)))
        return torch.randperm(len(self), generator=generator).tolist()

    def iterate(self, generator: torch.Generator | None = None, skip: int = 0) -> "PassIterator":
        """One pass over the data, skipping bad samples; yields ``(image, caption)``.

        ``generator`` shuffles (None: stored order) and seeds the per-sample augmentation; seed it per epoch,
        e.g. ``torch.Generator().manual_seed(seed + epoch)``. ``skip``: start at position ``skip`` of the
        pass's order (resume); the iterator's ``position`` is the value to store for that (with no bad data it
        equals the number of samples yielded).
        """
        return PassIterator(self, generator, skip)

    def batches(self, batch_size: int, generator: torch.Generator | None = None, skip: int = 0,
                drop_last: bool = True):
        """One pass as batches ``(images (B, 3, R, R), captions)``; needs a transform. See :meth:`iterate`."""
        if self.transform is None:
            raise LcmkitError("batches() needs a transform (ImageTransform) to stack images into tensors")
        if len(self) < batch_size:
            raise LcmkitError(f"{self.name} has {len(self)} samples, fewer than one batch ({batch_size}); "
                              "use a smaller batch size or more data")
        images, captions, produced = [], [], 0
        for img, cap in self.iterate(generator, skip):
            images.append(img)
            captions.append(cap)
            if len(images) == batch_size:
                produced += 1
                yield torch.stack(images), captions
                images, captions = [], []
        if images and not drop_last:
            produced += 1
            yield torch.stack(images), captions
        if produced == 0 and skip == 0:
            raise LcmkitError(f"{self.name}: only {len(images)} usable samples in a whole pass, fewer than one "
                              f"batch ({batch_size}); skipped: {dict(self.skipped)}")


class PassIterator:
    """Iterator over one pass of an :class:`ImageTextDataset`; ``position`` = positions consumed (for resume)."""

    def __init__(self, dataset: ImageTextDataset, generator: torch.Generator | None, skip: int):
        if skip < 0:
            raise LcmkitError(f"skip must be >= 0, got {skip}")
        self.dataset = dataset
        self._order = dataset.order(generator)
        # one seed for all per-sample randomness of this pass: sample p uses rng([aug_seed, p])
        self._aug_seed = int(torch.randint(2**62, (1,), generator=generator)) if generator is not None else 0
        self.position = min(skip, len(self._order))
        self._finished = False

    def __iter__(self):
        return self

    def __next__(self):
        ds = self.dataset
        while self.position < len(self._order):
            p = self.position
            self.position += 1
            ds.seen += 1
            try:
                img, caption = ds.load(self._order[p])
            except BadSample as e:
                ds.skipped[e.reason] += 1
                ds._check_bad_fraction(end_of_pass=False)
                continue
            ds._check_bad_fraction(end_of_pass=False)
            if ds.transform is not None:
                img = ds.transform(img, np.random.default_rng([self._aug_seed, p]))
            return img, caption
        if not self._finished:
            self._finished = True
            ds._check_bad_fraction(end_of_pass=True)
        raise StopIteration


def load_dataset(path, transform: ImageTransform | None = None, caption_key: str = "text", **kwargs) -> ImageTextDataset:
    """Open an imagefolder or WebDataset shards, detecting the format from ``path``.

    ``path``: a folder with ``metadata.jsonl`` (imagefolder); a folder of ``*.tar``, a ``.tar`` file, a glob or
    brace pattern, or a list of those (webdataset). Other keyword arguments go to :class:`ImageTextDataset`.
    """
    if isinstance(path, (list, tuple)):
        return _webdataset(path, transform, **kwargs)
    s = str(path)
    p = Path(s)
    if p.is_dir():
        if (p / METADATA_FILE).exists():  # index_imagefolder refuses one that is not a regular file
            return ImageTextDataset(index_imagefolder(p, caption_key), transform, name=str(p), **kwargs)
        if any(p.glob("*.tar")):
            return _webdataset(p, transform, **kwargs)
        raise LcmkitError(f"{p} has neither {METADATA_FILE} (imagefolder) nor .tar shards (webdataset)")
    if p.exists() or "{" in s or glob.has_magic(s):  # a file, or something that is not one (counted, not read)
        return _webdataset(s, transform, **kwargs)
    raise LcmkitError(f"dataset {s} does not exist")


def _webdataset(spec, transform, **kwargs) -> ImageTextDataset:
    problems: Counter = Counter()
    records = [r for shard in resolve_shards(spec) for r in index_shard(shard, problems)]
    name = str(spec) if isinstance(spec, (str, Path)) else f"{len(spec)} shard patterns"
    if not records:
        raise LcmkitError(f"{name}: no samples found (shard problems: {dict(problems) or 'none'})")
    return ImageTextDataset(records, transform, name=name, skipped=problems, **kwargs)
