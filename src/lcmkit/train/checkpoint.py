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


def damaged(path: str | os.PathLike, what: str) -> LcmkitError:
    """The one message of a checkpoint that cannot be resumed from: what is wrong, and what to do."""
    return LcmkitError(f"checkpoint {path} is damaged ({what}); delete it to resume from the one before")


def _inside(path: Path, root: Path) -> bool:
    real = path.resolve()
    return real == root or real.is_relative_to(root)


def _outside(path: Path, root: Path) -> LcmkitError:
    return LcmkitError(f"{path} links to {path.resolve()}, outside the run folder {root}; lcmkit follows no link out "
                       "of a run folder: move the checkpoint into it (or remove the link)")


def checkpoint_dirs(out_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``out_dir/checkpoints``, oldest first. A ``checkpoints`` folder or a checkpoint
    that is a link leading out of ``out_dir`` is refused, never followed."""
    root = Path(out_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    run = Path(out_dir).resolve()
    if not _inside(root, run):
        raise _outside(root, run)
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / STATE_FILE).is_file()]
    for p in found:
        if not _inside(p, run):
            raise _outside(p, run)
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
    """(weights by name, training state) of a checkpoint folder; ``torch.load(weights_only=True)`` only, and no file
    that links out of the run folder (``path/../..``)."""
    from safetensors.torch import load_file

    path = Path(path)
    run = path.parent.parent.resolve()
    files = sorted(path.glob("*.safetensors"))
    for f in [*files, path / STATE_FILE]:
        if not _inside(f, run):
            raise _outside(f, run)
    try:  # a damaged or replaced weights file (even a pickle named .safetensors) fails to parse, never unpickles
        weights = {p.stem: load_file(str(p)) for p in files}
    except Exception as e:
        raise LcmkitError(f"checkpoint {path} has an unreadable weights file ({type(e).__name__}: {e}); delete "
                          "it to resume from the one before") from e
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LcmkitError(f"checkpoint {path} could not be read ({type(e).__name__}: {e}); delete it to resume "
                          "from the one before") from e
    if not isinstance(state, dict):
        raise damaged(path, f"{STATE_FILE} holds a {type(state).__name__}, not a training state")
    return weights, state


def _nonfinite(tensors: dict) -> str | None:
    """The first name whose tensor holds NaN or inf (floating tensors, nested dicts / lists), or None."""
    for name, v in tensors.items():
        items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else None
        if items is not None:
            inner = _nonfinite(dict(items))
            if inner is not None:
                return f"{name}.{inner}"
        elif isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            return str(name)
    return None


def check_loaded(path: str | os.PathLike, weights: dict[str, dict[str, torch.Tensor]], state: dict) -> None:
    """Refuse a checkpoint whose weights or optimizer state hold NaN / inf, or whose training state lacks a part
    :func:`restore_training_state` needs, with the :func:`damaged` message (never a silent NaN run or a KeyError)."""
    for group, tensors in weights.items():
        bad = _nonfinite(tensors)
        if bad is not None:
            raise damaged(path, f"{group}.safetensors holds NaN or inf in {bad}")
    for key, kind in (("step", int), ("optimizer", dict), ("lr_scheduler", dict), ("scaler", dict), ("rng", dict),
                      ("data", dict), ("nonfinite", dict), ("processes", int)):
        if not isinstance(state.get(key), kind):
            raise damaged(path, f"its {STATE_FILE} has no {key!r}" if key not in state else
                          f"{key!r} in its {STATE_FILE} is a {type(state[key]).__name__}, not a {kind.__name__}")
    bad = _nonfinite(state["optimizer"].get("state", {}))
    if bad is not None:
        raise damaged(path, f"the optimizer state holds NaN or inf in {bad}")
    for key in ("epoch", "position"):
        v = state["data"].get(key)
        if not (isinstance(v, torch.Tensor) and v.ndim == 1 and len(v) == state["processes"]):
            raise damaged(path, f"its data position {key!r} is missing or not one entry per process")


def check_restored(path: str | os.PathLike, current: dict[str, dict[str, torch.Tensor]],
                   loaded: dict[str, dict[str, torch.Tensor]]) -> None:
    """After a resume: the model holds exactly the checkpoint's weights (``current``: what the run would checkpoint
    now). A missing group or tensor, another shape (even one that broadcast when copied in) or other values mean
    the checkpoint was damaged."""
    for group, tensors in current.items():
        if group not in loaded:
            raise damaged(path, f"it has no {group}.safetensors")
        saved = loaded[group]
        missing = sorted(set(tensors) - set(saved))
        if missing or set(saved) - set(tensors):
            raise damaged(path, f"{group}.safetensors holds other tensors than this model "
                                f"({(missing or sorted(set(saved) - set(tensors)))[0]})")
        for name, value in tensors.items():
            if tuple(value.shape) != tuple(saved[name].shape):
                raise damaged(path, f"{name} in {group}.safetensors has shape {tuple(saved[name].shape)}, the model "
                                    f"{tuple(value.shape)}")
            if not torch.equal(value.detach().to("cpu", saved[name].dtype), saved[name]):
                raise damaged(path, f"{name} in {group}.safetensors did not load as saved")


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
    """Load what :func:`training_state` saved; refuse a checkpoint whose ``must_match`` settings differ, and one
    whose state does not load (:func:`damaged`).

    Returns (step, process ``rank``'s data position (epoch, position in its share)).
    """
    for key, value in must_match.items():
        if state.get(key) != value:
            raise LcmkitError(f"checkpoint {path} was made with {key}={state.get(key)}, this run has {value}; "
                              "resume with the same setting (or start a new --out)")
    try:
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        if scaler is not None and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        guard.load_state_dict(state["nonfinite"])
        set_rng_state(state["rng"])
        return int(state["step"]), (int(state["data"]["epoch"][rank]), int(state["data"]["position"][rank]))
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        raise damaged(path, f"its training state does not load: {type(e).__name__}: {e}") from e
