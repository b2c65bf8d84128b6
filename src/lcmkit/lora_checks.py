"""What a LoRA must be before any of it is used: a safetensors file, plain LoRA (not another adapter type), finite
numbers, a usable alpha and rank, a weight λ in range. Each check raises :class:`LcmkitError` naming the file, key,
tensor or value.

- **Safetensors only**: ``.ckpt/.bin/.pt/.pth/.pkl`` names and pickle / ``torch.save`` contents are refused before
  anything is parsed; ``torch.load`` is never called on a user's file.

- **Other adapter types are refused by name, file-wide, before anything is resolved**, so a file is applied whole
  or not at all: LyCORIS LoHa (``hada_w1_a`` …), LoKr (``lokr_w1`` …), GLoRA (``a1.weight`` …), IA3
  (``on_input``), OFT (``oft_blocks``/``oft_diag``), full/norm diffs (``diff``, ``w_norm``), DoRA (``dora_scale``,
  ``lora_magnitude_vector``). LyCORIS LoCon is plain LoRA on convolutions (``lora_down``/``lora_up``, optionally a
  ``lora_mid`` core) and is read (:mod:`lcmkit.lora_formats`).
- **Numbers**: every tensor finite; an alpha is one finite number (a JSON number in the header, a one-element
  tensor in the file) that stays finite in float32; a rank is ≥ 1; a LoRA weight λ is finite with
  |λ| ≤ :data:`MAX_LORA_WEIGHT`.
"""

from __future__ import annotations

import math
import numbers
import os
import re
import struct
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor

from .errors import LcmkitError

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle")

#: Largest |λ| accepted for one LoRA (ComfyUI's LoraLoader offers ±20, some of its versions ±100; past that the
#: update swamps the model's weights and the image comes out black).
MAX_LORA_WEIGHT = 100.0

#: key suffix (after the module name) → the adapter type it belongs to
_OTHER_ADAPTERS = (
    (re.compile(r"\.hada_(w1_a|w1_b|w2_a|w2_b|t1|t2)$"), "LyCORIS LoHa"),
    (re.compile(r"\.lokr_(w1|w2|w1_a|w1_b|w2_a|w2_b|t1|t2)$"), "LyCORIS LoKr"),
    (re.compile(r"\.(a1|a2|b1|b2)\.weight$"), "LyCORIS GLoRA"),
    (re.compile(r"\.on_input$"), "IA3"),
    (re.compile(r"\.oft_(blocks|diag)$|^oft_"), "OFT"),
    (re.compile(r"\.(diff|diff_b)$"), "LyCORIS full (weight difference)"),
    (re.compile(r"\.(w_norm|b_norm)$"), "LyCORIS norm"),
    (re.compile(r"\.dora_scale$|lora_magnitude_vector"), "DoRA"),
)


def adapter_kind(key: str) -> str | None:
    """The non-LoRA adapter type a key belongs to (``"LyCORIS LoHa"`` …), or None for anything else."""
    for pattern, kind in _OTHER_ADAPTERS:
        if pattern.search(key):
            return kind
    return None


def refuse_other_adapters(keys: Iterable[str], source: str) -> None:
    """Raise naming the adapter type and the first key of a file that holds anything but plain LoRA."""
    for key in keys:
        kind = adapter_kind(key)
        if kind is not None:
            raise LcmkitError(f"{source} is a {kind} file (key {key!r}), not a LoRA; lcmkit applies plain LoRA and "
                              "LyCORIS LoCon (lora_down/lora_up, optionally lora_mid) only, so none of it was used")


def check_finite(tensor: Tensor, name: str, source: str) -> None:
    """Raise naming ``name`` when ``tensor`` holds a NaN or an infinity."""
    if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
        bad = "NaN" if bool(torch.isnan(tensor).any()) else "inf"
        raise LcmkitError(f"{source}: tensor {name!r} holds {bad} values; the file is damaged (a LoRA trained "
                          "into NaN?), refusing to apply it")


def _float32_finite(value: float, what: str) -> float:
    if not math.isfinite(value) or not math.isfinite(float(torch.tensor(value, dtype=torch.float32))):
        raise LcmkitError(f"{what} is {value!r}, not a finite float32 number")
    return value


def alpha_value(value, what: str) -> float:
    """One alpha as a float: a JSON number (not a bool, string or list) or a one-element tensor; finite in float32."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise LcmkitError(f"{what} must hold one number, it has shape {tuple(value.shape)}")
        return _float32_finite(float(value.float().reshape(-1)[0]), what)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise LcmkitError(f"{what} must be a number, got {value!r} ({type(value).__name__})")
    return _float32_finite(float(value), what)


def check_rank(key: str, down: Tensor) -> None:
    """A LoRA layer needs rank ≥ 1 (the scale is alpha / rank)."""
    if down.ndim < 2 or down.shape[0] < 1:
        raise LcmkitError(f"LoRA key {key!r} has rank 0 (down {tuple(down.shape)}): an empty LoRA layer")


def check_lora_weight(lam, what: str = "LoRA weight") -> float:
    """λ as a float: finite, |λ| ≤ :data:`MAX_LORA_WEIGHT`."""
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real):
        raise LcmkitError(f"{what} must be a number, got {lam!r}")
    lam = float(lam)
    if not math.isfinite(lam) or abs(lam) > MAX_LORA_WEIGHT:
        raise LcmkitError(f"{what} is {lam!r}; give a finite number between -{MAX_LORA_WEIGHT:g} and "
                          f"{MAX_LORA_WEIGHT:g} (1.0 applies the LoRA as trained)")
    return lam


def check_safetensors_file(path: str | os.PathLike) -> Path:
    """Refuse anything but a safetensors file, by name and by content; never unpickles.

    A safetensors file starts with a little-endian u64 header length N followed by a JSON object (``{``) of N
    bytes. Pickles start with ``0x80`` (protocol ≥ 2), ``torch.save`` zips with ``PK``; those magics are only
    looked for in a file that is not laid out as safetensors (a header length may itself start with those bytes).
    """
    path = Path(path)
    if not path.is_file():
        raise LcmkitError(f"LoRA file {path} not found")
    how = "convert it to .safetensors first (e.g. load it in a trusted environment and save with safetensors)"
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LcmkitError(f"LoRA file {path} is a pickle checkpoint ({path.suffix}); lcmkit only reads safetensors "
                          f"because unpickling can run arbitrary code: {how}")
    with open(path, "rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    if len(head) == 9 and struct.unpack("<Q", head[:8])[0] + 8 <= size and head[8:9] == b"{":
        return path
    if head[:1] == b"\x80" or head[:2] == b"PK":
        raise LcmkitError(f"LoRA file {path} contains a pickle / torch.save checkpoint despite its name; lcmkit "
                          f"only reads safetensors because unpickling can run arbitrary code: {how}")
    raise LcmkitError(f"LoRA file {path} is not a valid safetensors file")


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, header metadata) of a checked safetensors file."""
    from safetensors import safe_open

    path = check_safetensors_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # a corrupt header or truncated data
        raise LcmkitError(f"LoRA file {path} could not be read as safetensors: {e}") from e
