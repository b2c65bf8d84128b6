"""Checkpoints: one format and one writer for every lcmkit trainer.

A checkpoint is a folder ``<run>/checkpoints/step-<N>/`` written atomically (:func:`lcmkit.atomic.atomic_folder`):
``<name>.safetensors`` per weight group and ``training_state.pt`` (tensors, numbers, strings, lists and dicts only,
read back with ``torch.load(weights_only=True)``, never pickled objects). The last K are kept.
:func:`training_state` / :func:`restore_training_state` are the recipe-independent part of the state (step,
optimizer, LR schedule, scaler, guard, RNG, data positions).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from ..atomic import atomic_folder
from ..errors import LcmkitError
from .optim import NonFiniteGuard
from .rng import rng_state, set_rng_state

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step-"
STATE_FILE = "training_state.pt"


def checkpoint_dirs(out_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``out_dir/checkpoints``, oldest first."""
    root = Path(out_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def save_checkpoint(out_dir: str | os.PathLike, step: int, weights: dict[str, dict[str, torch.Tensor]],
                    state: dict, config_writer: Callable[[Path], None] | None = None, keep: int = 3) -> Path:
    """Write ``checkpoints/step-<step>/`` atomically and keep the last ``keep`` (0 = all).

    ``weights``: name → state dict, each saved as ``<name>.safetensors``. ``state``: optimizer, scheduler, RNG,
    data position, counters (tensors / numbers / strings / lists / dicts only) → ``training_state.pt``.
    """
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        for name, tensors in weights.items():
            save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp / f"{name}.safetensors"))
        torch.save(state, tmp / STATE_FILE)
        if config_writer is not None:
            config_writer(tmp)

    final = atomic_folder(Path(out_dir) / CHECKPOINT_DIR / f"{CHECKPOINT_PREFIX}{step:07d}", write)
    if keep:
        for old in checkpoint_dirs(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """(weights by name, training state) of a checkpoint folder; ``torch.load(weights_only=True)`` only."""
    from safetensors.torch import load_file

    path = Path(path)
    try:  # a damaged or replaced weights file (even a pickle named .safetensors) fails to parse, never unpickles
        weights = {p.stem: load_file(str(p)) for p in sorted(path.glob("*.safetensors"))}
    except Exception as e:
        raise LcmkitError(f"checkpoint {path} has an unreadable weights file ({type(e).__name__}: {e}); delete "
                          "it to resume from the one before") from e
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LcmkitError(f"checkpoint {path} could not be read ({type(e).__name__}: {e}); delete it to resume "
                          "from the one before") from e
    return weights, state


def training_state(step: int, optimizer, lr_scheduler, scaler, guard: NonFiniteGuard, positions: torch.Tensor,
                   processes: int, **extra) -> dict:
    """The recipe-independent part of a checkpoint's ``training_state.pt`` (weights_only-loadable); ``extra``:
    counters and the settings a resume must match (checked by :func:`restore_training_state`)."""
    return {"step": step, "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {}, "rng": rng_state(),
            "data": {"epoch": positions[:, 0].clone(), "position": positions[:, 1].clone()},
            "nonfinite": guard.state_dict(), "processes": processes, **extra}


def restore_training_state(path: str | os.PathLike, state: dict, optimizer, lr_scheduler, scaler,
                           guard: NonFiniteGuard, must_match: dict[str, Any], rank: int) -> tuple[int, tuple[int, int]]:
    """Load what :func:`training_state` saved; refuse a checkpoint whose ``must_match`` settings differ.

    Returns (step, process ``rank``'s data position (epoch, position in its share)).
    """
    for key, value in must_match.items():
        if state.get(key) != value:
            raise LcmkitError(f"checkpoint {path} was made with {key}={state.get(key)}, this run has {value}; "
                              "resume with the same setting (or start a new --out)")
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    guard.load_state_dict(state["nonfinite"])
    set_rng_state(state["rng"])
    return int(state["step"]), (int(state["data"]["epoch"][rank]), int(state["data"]["position"][rank]))
