"""LoRA files read once per process: the converted and checked weights of a file, kept in a small LRU for as long as
the file on disk and the layout of the model it was read against stay the same.

Reading a LoRA for sampling means parsing the file, converting every key against the model's module names
(:mod:`lcmkit.lora_formats`) and checking every layer (:func:`lcmkit.task_arithmetic.check_weights_fit`); on the
world's 4.3M-parameter UNet that costs 0.05 s, more than half of sampling 4 steps. ``generate(…, loras=…)`` called
again with the same file takes the result from here.

The key of an entry is

- the file: its resolved path and its ``stat`` (device, inode, size, mtime and ctime in ns). Writing the file in
  place, replacing it (a rename over it, a new file under the old name) or pointing a symlink elsewhere changes the
  key; so does setting the mtime back after a write (the ctime cannot be set back);
- the models' layout (:func:`layout_key`): every module's name and class, and each Linear/Conv2d's shape options,
  which is all the conversion and the checks look at (values, dtype and device are not used; weights stay in the
  file's dtype on the CPU).

Two guards keep a stale entry from being used:

- *racily clean* (as git's index): a file modified less than :data:`RACY_SECONDS` before it was read is not kept,
  since a second write within the same timestamp tick could leave its ``stat`` unchanged; nor is a file whose
  ``stat`` changed while it was being read;
- tensors are copied out of the file: safetensors maps the file into memory, so a kept view would follow an
  in-place rewrite of the file (or fault once it is truncated).

Memory is bounded: at most ``max_entries`` files and ``max_bytes`` of tensors; the least recently used entry goes
first and a file larger than ``max_bytes`` is never kept. ``LORA_CACHE.clear()`` empties it.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from torch import Tensor, nn

from .lora_formats import LoraLayer, LoraWeights

#: a file modified this recently (seconds) when it is read is not kept (coarse timestamps: FAT 2 s, ext3 1 s)
RACY_SECONDS = 2.0


@dataclass(frozen=True)
class CheckedLora:
    """One file's weights converted against a model layout and checked to fit it; ``bounds[name]`` is the largest
    entry (α/r)·up@down can reach at λ = 1 with the factors' largest entries (:func:`lcmkit.task_arithmetic.
    update_bounds`), so checking a new λ costs a multiplication per layer."""

    weights: LoraWeights
    bounds: dict[str, tuple[float, float, float]]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for layer in self.weights.values() for t in (layer.down, layer.up))


def owned(weights: LoraWeights) -> LoraWeights:
    """The same layers with tensors in memory of their own (not views of the file's memory map)."""
    return {name: LoraLayer(layer.down.clone(), layer.up.clone(), layer.alpha) for name, layer in weights.items()}


def layout_key(models: Mapping[str, nn.Module]) -> str:
    """A digest of ``models``' layout: each module's name and class, and for Linear/Conv2d its shape options
    (``extra_repr``: features, channels, kernel, stride, padding, groups, padding mode)."""
    h = hashlib.blake2b(digest_size=16)
    for component in sorted(models):
        for name, module in models[component].named_modules():
            shape = module.extra_repr() if isinstance(module, (nn.Linear, nn.Conv2d)) else ""
            h.update(f"{component}.{name}|{type(module).__qualname__}|{shape}\n".encode())
    return h.hexdigest()


def _file_stat(path: Path) -> tuple[int, ...]:
    s = os.stat(path)
    return s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns


class LoraCache:
    """Least-recently-used :class:`CheckedLora` entries, bounded in count and bytes (module docstring)."""

    def __init__(self, max_entries: int = 4, max_bytes: int = 1 << 30):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: OrderedDict[tuple, CheckedLora] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def clear(self) -> None:
        """Forget every entry and zero the hit and miss counts."""
        with self._lock:
            self._entries.clear()
            self.hits = self.misses = 0

    def get_or_read(self, path: str | os.PathLike, models: Mapping[str, nn.Module],
                    read: Callable[[Path], CheckedLora]) -> CheckedLora:
        """The entry for ``path`` against ``models``, else ``read(path)`` (which raises on a bad file), kept
        when the file is not racily clean and did not change while it was read."""
        try:
            real = Path(path).resolve()
            before = _file_stat(real)
        except OSError:  # missing or unreadable: the read raises the error that names it
            return read(Path(path))
        key = (str(real), before, layout_key(models))
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry
            self.misses += 1
        entry = read(Path(path))
        entry = CheckedLora(owned(entry.weights), entry.bounds)
        try:
            unchanged = Path(path).resolve() == real and _file_stat(real) == before
        except OSError:
            unchanged = False
        # stat says nothing about a second write within the timestamp tick of the first: such files are not kept
        if unchanged and time.time() - before[3] / 1e9 >= RACY_SECONDS:
            self._put(key, entry)
        return entry

    def _put(self, key: tuple, entry: CheckedLora) -> None:
        if entry.nbytes > self.max_bytes or self.max_entries < 1:
            return
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries or self.nbytes > self.max_bytes:
                self._entries.popitem(last=False)


#: the process's cache, used by :func:`lcmkit.task_arithmetic.apply_loras` (so ``generate``, ``eval``, the benches)
LORA_CACHE = LoraCache()
