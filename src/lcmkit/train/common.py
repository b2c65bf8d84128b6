"""Training utilities shared by lcmkit's recipes (distillation, LCF fine-tuning, style LoRAs).

Each piece is a small function or dataclass a recipe calls explicitly; nothing here owns a training loop.

- **config**: :func:`build_config` turns YAML (flat or nested by section) + CLI overrides into a typed dataclass
  (CLI wins); unknown keys are errors that name the nearest known key. :func:`save_config` writes the resolved
  config (YAML) next to every checkpoint and output. :class:`TrainingOptions` holds the options every recipe shares
  and checks them (:meth:`TrainingOptions.check_training`).
- **processes**: :func:`setup_accelerator` (one or many processes: ``accelerate launch``, ``torchrun``; gloo on
  CPU), :func:`sync_gradients` (mean of gradients over processes, done by hand: see its docstring for why).
- **optimisation**: :class:`OptimConfig` / :func:`make_optimizer` (AdamW), :func:`lr_factor` (warm-up, then
  constant or cosine, a pure function of the *optimizer* step, so it is never stretched by the number of
  processes), :func:`ema_update_`, :class:`NonFiniteGuard`, and :func:`optimizer_step`: everything between the
  micro-batches' backward passes and the next step, taken or skipped identically on every process.
- **checkpoints**: :func:`save_checkpoint` writes a folder atomically (temp folder, fsync, ``os.replace``) and
  keeps the last K; :func:`load_checkpoint` reads it back with ``torch.load(weights_only=True)``: tensors,
  numbers, strings, lists and dicts only, never pickled objects. :func:`rng_state` / :func:`set_rng_state` store
  torch, numpy and python RNG states in that form. :func:`training_state` / :func:`restore_training_state` are the
  recipe-independent part of a checkpoint (step, optimizer, LR schedule, scaler, guard, RNG, data positions).
- **output folders**: :func:`prepare_output_dir` refuses a folder with results unless overwrite or resume.
- **logging**: :class:`RunLogger` (TensorBoard when installed + a JSON-lines log), :func:`save_image_grid`.
- **a recipe's run**: :func:`open_run_folder`, :func:`make_optimisation`, :func:`resume_run`,
  :func:`training_step` (micro-batches + :func:`optimizer_step`), :class:`RunProgress` (bar, log lines, when
  checkpoints and grids are due), :func:`save_run_checkpoint`, :func:`check_same_weights`: the parts of the loop
  that distillation, LCF fine-tuning and style LoRAs share; the losses, models and outputs stay in the recipes.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import random
import shutil
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from ..errors import LcmkitError
from .data import is_world, world_data

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step-"
STATE_FILE = "training_state.pt"
CONFIG_FILE = "config.yaml"


# ---------------------------------------------------------------------------------------------------------------
# Config: YAML + CLI overrides -> typed dataclass
# ---------------------------------------------------------------------------------------------------------------

def _sections(cls) -> dict[str, type]:
    """Fields of ``cls`` that are themselves dataclasses (nested config sections)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def config_keys(cls) -> dict[str, str | None]:
    """Every settable key of ``cls`` → the section it lives in (None: top level). Keys are unique across sections."""
    sections = _sections(cls)
    keys: dict[str, str | None] = {f.name: None for f in dataclasses.fields(cls) if f.name not in sections}
    for section, sub in sections.items():
        for f in dataclasses.fields(sub):
            if f.name in keys:
                raise TypeError(f"config key {f.name!r} appears twice in {cls.__name__}")
            keys[f.name] = section
    return keys


#: section of a saved config.yaml with the values the run derived (architecture, grid, ...); ignored on reading,
#: so a saved config can be handed back with ``--config``
RESOLVED_KEY = "resolved"


def _flatten(raw: dict, cls, source: str) -> dict[str, Any]:
    """YAML dict (sections nested or not, ``-`` or ``_`` in keys) → flat {key: value}."""
    keys, sections = config_keys(cls), _sections(cls)
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        key = str(key).replace("-", "_")
        if key in sections and isinstance(value, dict):
            flat.update(_flatten(value, sections[key], f"{source} section {key!r}"))
            continue
        if key not in keys:
            near = difflib.get_close_matches(key, list(keys), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; known keys: {', '.join(sorted(keys))}"
            raise LcmkitError(f"unknown option {key!r} in {source}{hint}")
        flat[key] = value
    return flat


def load_yaml(path: str | os.PathLike) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise LcmkitError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise LcmkitError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise LcmkitError(f"config file {path} must hold a mapping of option: value, got {type(data).__name__}")
    return data


def build_config(cls, yaml_path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None):
    """``cls`` from defaults ← YAML file ← ``overrides`` (CLI; entries that are None are ignored).

    Validation happens in the dataclasses' ``__post_init__`` and raises :class:`LcmkitError`.
    """
    raw = load_yaml(yaml_path) if yaml_path else {}
    raw.pop(RESOLVED_KEY, None)  # what save_config wrote for the record: derived values, not settings
    flat = _flatten(raw, cls, str(yaml_path)) if yaml_path else {}
    flat.update(_flatten({k: v for k, v in (overrides or {}).items() if v is not None}, cls, "the command line"))
    keys, sections = config_keys(cls), _sections(cls)
    top = {k: v for k, v in flat.items() if keys[k] is None}
    defaults = {f.name: f.default_factory for f in dataclasses.fields(cls) if f.name in sections}
    for section, sub in sections.items():
        # a recipe may set its own section defaults (its field's default_factory): they come before YAML and flags
        base = dataclasses.asdict(defaults[section]()) if defaults[section] is not dataclasses.MISSING else {}
        top[section] = _construct(sub, {**base, **{k: v for k, v in flat.items() if keys[k] == section}})
    return _construct(cls, top)


def _construct(cls, kwargs: dict):
    try:
        return cls(**kwargs)
    except TypeError as e:  # a wrong type that __post_init__ did not catch
        raise LcmkitError(f"bad configuration for {cls.__name__}: {e}") from e


def config_to_dict(cfg) -> dict:
    """A dataclass config as plain data (tuples → lists), for YAML/JSON."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v
    return plain(dataclasses.asdict(cfg))


def save_config(cfg, folder: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write the resolved config (plus ``extra`` resolved values, under ``resolved:``) as ``folder/config.yaml``."""
    import yaml

    data = config_to_dict(cfg)
    if extra:
        data[RESOLVED_KEY] = extra
    path = Path(folder) / CONFIG_FILE
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------------------------
# Processes and precision
# ---------------------------------------------------------------------------------------------------------------

MIXED_PRECISION = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def setup_accelerator(mixed_precision: str = "no", cpu: bool = False):
    """An ``accelerate.Accelerator`` for process setup only (device, rank, world size, collectives).

    Works under ``accelerate launch`` and ``torchrun`` (gloo on CPU, nccl on GPU). Mixed precision is applied by
    the recipe itself (:func:`autocast`), so frozen models run in the weight dtype outside autocast.
    """
    from accelerate import Accelerator

    # accelerate only sets up a multi-process CPU group (gloo) when told it runs on CPU
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(cpu=cpu or (multi_process and not torch.cuda.is_available()))


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """dtype of the frozen models (teacher, VAE, text encoders): fp16/bf16 under mixed precision, else float32."""
    return MIXED_PRECISION[mixed_precision]


def autocast(device: torch.device, mixed_precision: str):
    """Autocast context for the trainable model's forward; a no-op context for ``"no"``."""
    return torch.autocast(device_type=device.type, dtype=MIXED_PRECISION[mixed_precision],
                          enabled=mixed_precision != "no")


def make_grad_scaler(device: torch.device, mixed_precision: str):
    """A GradScaler for fp16 (starting at 2¹⁰, not 2¹⁶, so the first steps rarely overflow), else None."""
    if mixed_precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type, init_scale=2.0**10)


def sync_gradients(params: Iterable[torch.nn.Parameter], accelerator) -> None:
    """Average gradients over processes (data parallel), in place.

    Done by hand instead of wrapping the model in DDP: in LCM-LoRA one UNet serves as teacher (adapters off),
    student and target, and DDP's forward hooks (and accelerate's autocast patching of ``forward``) would apply
    to all three. One all-reduce per optimizer step, after the last micro-batch, as DDP's ``no_sync`` does.
    """
    if accelerator.num_processes == 1:
        return
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= accelerator.num_processes
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def all_reduce_mean(value: torch.Tensor, accelerator) -> torch.Tensor:
    """Mean of a tensor over processes (a NaN anywhere makes it NaN everywhere: all ranks skip together)."""
    if accelerator.num_processes == 1:
        return value
    import torch.distributed as dist

    value = value.detach().clone()
    dist.all_reduce(value)
    return value / accelerator.num_processes


# ---------------------------------------------------------------------------------------------------------------
# Optimizer, learning rate, EMA, non-finite guard
# ---------------------------------------------------------------------------------------------------------------

LR_SCHEDULES = ("constant", "cosine")


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule, in optimizer steps (not micro-batches, not per-process steps)."""

    lr: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    warmup_steps: int = 100
    lr_schedule: str = "constant"
    max_grad_norm: float = 1.0

    def __post_init__(self):
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise LcmkitError(f"lr must be a positive number, got {self.lr} (typical: 1e-4 for LoRA, 1e-5 full)")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise LcmkitError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.weight_decay < 0 or self.adam_eps <= 0:
            raise LcmkitError("weight_decay must be >= 0 and adam_eps > 0")
        if self.warmup_steps < 0:
            raise LcmkitError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise LcmkitError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.max_grad_norm < 0:
            raise LcmkitError(f"max_grad_norm must be >= 0 (0 turns clipping off), got {self.max_grad_norm}")


def make_optimizer(params: list[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             weight_decay=cfg.weight_decay, eps=cfg.adam_eps)


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str = "constant") -> float:
    """Multiplier of the base LR at optimizer step ``step`` (0-based).

    1. linear warm-up: (step + 1) / warmup_steps for step < warmup_steps;
    2. then ``constant``: 1, or ``cosine``: ½(1 + cos(π·p)), p = progress through the remaining steps.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    p = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * p))


def make_lr_scheduler(optimizer, cfg: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over :func:`lr_factor`; step it once per optimizer step on every process (never ``prepare`` it:
    accelerate's wrapper would step it ``num_processes`` times)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, total_steps, cfg.lr_schedule))


@torch.no_grad()
def ema_update_(target: Iterable[torch.Tensor], online: Iterable[torch.Tensor], mu: float) -> None:
    """θ⁻ ← μ·θ⁻ + (1 − μ)·θ (LCM paper, Algorithm 1, last line). μ = 0 copies θ."""
    for t, o in zip(target, online):
        if mu == 0.0:
            t.copy_(o)
        else:
            t.lerp_(o.to(t.dtype), 1.0 - mu)


def grads_finite(params: Iterable[torch.nn.Parameter]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    return all(bool(torch.isfinite(g).all()) for g in grads)


@dataclass
class TrainingOptions:
    """The options every lcmkit training recipe shares (data, loop, checkpoints, validation, precision, AdamW).

    ``DistillConfig``, ``FinetuneConfig`` and ``StyleLoraConfig`` add their own fields to these; YAML keys and CLI
    flags (:func:`lcmkit.commands._training.add_training_args`) have the same names (``-`` for ``_``).
    """

    data: str = ""                    # imagefolder (metadata.jsonl), webdataset shards, or world / world:outlined
    resolution: int | None = None     # pixels; default the model's native size
    crop: str = "center"              # center or random
    flip: bool = False                # random horizontal flip (off: captions may say left/right)
    caption_key: str = "text"         # imagefolder caption column
    world_samples: int = 10000        # size of the built-in world dataset (images 0 … n−1 of seed ``seed``)
    cache_latents: bool = False       # encode every image once up front (needs crop=center, no flip)
    cache_text: bool | None = None    # encode every caption once up front; default: on for the world
    batch_size: int = 8               # per process, per micro-batch
    grad_accum: int = 1
    max_steps: int = 1000             # optimizer steps; the LR schedule spans these
    stop_at: int | None = None        # stop (with a checkpoint) after this step, schedule unchanged; for --resume
    mixed_precision: str = "no"       # no, fp16, bf16
    gradient_checkpointing: bool = False
    seed: int = 0                     # data order, world images, every training draw, LoRA init
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    validate_every: int = 500         # 0 = only at the end
    validation_prompts: list[str] = field(default_factory=list)  # default: the first batch's captions (≤ 4)
    validation_seed: int = 0
    log_every: int = 10
    max_nonfinite: int = 5            # stop after this many non-finite steps in a row (0 = never)
    resume: bool = False
    overwrite: bool = False
    device: str = "auto"              # auto (accelerate's choice) or cpu
    progress: bool = True
    optim: OptimConfig = field(default_factory=OptimConfig)

    def check_training(self, model_key: str) -> None:
        """Check what every recipe's config shares, each with a message that says how to fix it: the required
        ``model_key`` (the diffusers pipeline folder the recipe starts from: ``teacher``, ``model``), ``data`` and
        ``out``, then that folder, the data and the loop / precision / checkpoint options. Each recipe's
        ``__post_init__`` calls this first, then checks its own options."""
        if isinstance(self.optim, dict):  # a config built in code may pass the section as a dict
            self.optim = OptimConfig(**self.optim)
        for name in (model_key, "data", "out"):
            if not getattr(self, name):
                raise LcmkitError(f"--{name} is required")
        model = Path(getattr(self, model_key)).expanduser()
        if not model.is_dir():
            raise LcmkitError(f"{model_key} folder {model} not found; pass a diffusers pipeline folder (saved with "
                              "save_pretrained)")
        if not (model / "model_index.json").is_file():
            raise LcmkitError(f"{model_key} {model} is not a diffusers pipeline folder (no model_index.json)")
        if not is_world(self.data) and not any(c in self.data for c in "*{") and not Path(self.data).exists():
            raise LcmkitError(f"data {self.data} not found; pass an imagefolder, .tar shards, or 'world'")
        if is_world(self.data):
            world_data(self.data)  # raises on an unknown style
        if self.resolution is not None and self.resolution < 8:
            raise LcmkitError(f"resolution must be >= 8 pixels, got {self.resolution}")
        if self.crop not in ("center", "random"):
            raise LcmkitError(f"crop must be center or random, got {self.crop!r}")
        if self.cache_latents and (self.crop != "center" or self.flip):
            raise LcmkitError("cache_latents needs crop=center and flip off (a cached latent cannot be "
                              "re-augmented); drop --cache-latents or the augmentation")
        for name in ("batch_size", "grad_accum", "max_steps", "world_samples", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise LcmkitError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.stop_at is not None and not 1 <= self.stop_at <= self.max_steps:
            raise LcmkitError(f"stop_at must be in [1, max_steps={self.max_steps}], got {self.stop_at}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise LcmkitError(f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.keep_checkpoints < 0 or self.validate_every < 0 or self.max_nonfinite < 0:
            raise LcmkitError("keep_checkpoints, validate_every and max_nonfinite must be >= 0")
        if self.device not in ("auto", "cpu"):
            raise LcmkitError(f"device must be auto or cpu, got {self.device!r}")


@dataclass
class NonFiniteGuard:
    """Counts steps skipped for a non-finite loss or gradient; too many in a row stop the run.

    ``record(ok)`` returns True when the step may proceed; raises :class:`LcmkitError` after ``max_in_a_row``
    consecutive bad steps (0 = never stop).
    """

    max_in_a_row: int = 5
    skipped: int = 0
    in_a_row: int = 0

    def record(self, ok: bool, step: int, what: str = "loss") -> bool:
        if ok:
            self.in_a_row = 0
            return True
        self.skipped += 1
        self.in_a_row += 1
        if self.max_in_a_row and self.in_a_row >= self.max_in_a_row:
            raise LcmkitError(
                f"{self.in_a_row} training steps in a row had a non-finite {what} (last at step {step}; "
                f"{self.skipped} skipped in all); stopping, the last good checkpoint is kept. Likely causes: fp16 "
                "overflow (use --mixed-precision bf16 or no), a learning rate too high (lower --lr, add warm-up), "
                "or bad input data")
        return False

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.in_a_row = int(state["skipped"]), int(state["in_a_row"])


@dataclass
class StepOutcome:
    """What :func:`optimizer_step` did, for logs and progress bars."""

    loss: float            # this step's loss: mean over micro-batches (already divided) and processes
    ok: bool               # False: a non-finite loss/gradient, the step was skipped (and counted by the guard)
    grad_norm: float       # before clipping; nan when clipping is off or the step was skipped
    lr: float              # the learning rate this step used
    fp16_overflow: bool    # fp16 gradients overflowed: the scaler skipped the update and lowered its scale


def optimizer_step(params: list[torch.nn.Parameter], micro_losses: list[torch.Tensor], optimizer, lr_scheduler,
                   scaler, guard: NonFiniteGuard, accelerator, max_grad_norm: float, step: int) -> StepOutcome:
    """One optimizer step after the micro-batches' ``backward()`` (losses already divided by their number).

    1. gradients and the loss averaged over processes, so every rank takes the same decisions below;
    2. fp16: unscale the gradients; a non-finite loss (or gradient, without a scaler) skips the step and is counted
       by ``guard`` (which stops the run after too many in a row); under fp16 an overflow in the *gradients* is the
       scaler's business (it skips the update and lowers its scale), not an error;
    3. clipping (``max_grad_norm`` > 0), AdamW (through the scaler under fp16);
    4. scaler update and one LR-schedule step (once per optimizer step, on every process).
    ``step`` is the 1-based number of this step, for the guard's message. EMA updates are the caller's, when ``ok``.
    """
    sync_gradients(params, accelerator)
    loss = all_reduce_mean(torch.stack(micro_losses).sum(), accelerator)
    if scaler is not None:
        scaler.unscale_(optimizer)
    loss_ok = bool(torch.isfinite(loss))
    grads_ok = grads_finite(params)
    ok = guard.record(loss_ok and (grads_ok or scaler is not None), step, "loss" if not loss_ok else "gradient")
    grad_norm = float("nan")
    if ok:
        if max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
        if scaler is not None:
            scaler.step(optimizer)
        else:
            optimizer.step()
    if scaler is not None:
        scaler.update()
    lr = lr_scheduler.get_last_lr()[0]
    lr_scheduler.step()
    return StepOutcome(float(loss), ok, grad_norm, lr, ok and scaler is not None and not grads_ok)


def weights_checksums(params: Iterable[torch.nn.Parameter], accelerator) -> list[float]:
    """Σ of every trainable weight (float64), one per process: equal on all ranks when data parallelism held."""
    checksum = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1).to(accelerator.device)
    return accelerator.gather(checksum).cpu().tolist() if accelerator.num_processes > 1 else [float(checksum)]


# ---------------------------------------------------------------------------------------------------------------
# RNG states in weights_only-loadable form
# ---------------------------------------------------------------------------------------------------------------

def rng_state() -> dict:
    """torch (CPU and CUDA), numpy and python global RNG states as tensors / ints / lists only."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def generator_for(*key: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded by a tuple of integers (seed, step, micro-batch, rank, ...): draws that depend only on
    where they happen in the run, so a resumed run redraws exactly what the straight run drew."""
    seed = int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device).manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------
# Atomic checkpoints
# ---------------------------------------------------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
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


def atomic_folder(final: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a fresh temp folder beside ``final``, fsync it, then ``os.replace`` it onto ``final``.

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


def data_positions(position: tuple[int, int], accelerator) -> torch.Tensor:
    """Every process's data-stream position (epoch, position in its share), gathered: (W, 2) int64 on CPU."""
    mine = torch.tensor([*position], dtype=torch.int64, device=accelerator.device)
    if accelerator.num_processes == 1:
        return mine.cpu().view(1, 2)
    return accelerator.gather(mine).cpu().view(-1, 2)


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


# ---------------------------------------------------------------------------------------------------------------
# Output folders, logging, images
# ---------------------------------------------------------------------------------------------------------------

def prepare_output_dir(out_dir: str | os.PathLike, result_names: Iterable[str], overwrite: bool, resume: bool) -> Path:
    """Create ``out_dir``; refuse one that holds results (``result_names`` or checkpoints) unless ``overwrite``
    (those results are deleted) or ``resume`` (they are kept and training continues)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LcmkitError(f"output {out} exists and is not a folder; choose another --out")
    names = [CHECKPOINT_DIR, *result_names]
    present = [n for n in names if (out / n).exists()]
    if present and not (overwrite or resume):
        raise LcmkitError(f"output folder {out} already has results ({', '.join(present)}); pass --resume to "
                          "continue that run, --overwrite to replace it, or choose another --out")
    if present and overwrite and not resume:
        for n in present:
            target = out / n
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    # pre-flight: fail now, in words, rather than at the first checkpoint after hours of training
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".tmp-write-check-"):
            pass
    except OSError as e:
        raise LcmkitError(f"output folder {out} cannot be written ({e.strerror or e}); choose another --out or "
                          "fix its permissions") from e
    return out


class RunLogger:
    """Scalars to TensorBoard (when ``tensorboard`` is installed) and to ``log.jsonl``; main process only."""

    def __init__(self, log_dir: str | os.PathLike, enabled: bool = True):
        self.enabled = enabled
        self.writer = None
        self.file = None
        if not enabled:
            return
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir))
        except ImportError:  # tensorboard is optional (the dev extra)
            self.writer = None
        self.file = open(log_dir / "log.jsonl", "a")

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.file is not None:
            self.file.close()
            plot_log(Path(self.file.name), Path(self.file.name).with_name(LOSS_PLOT))


LOSS_PLOT = "loss.png"


def plot_log(log_file: str | os.PathLike, path: str | os.PathLike, smooth: int = 20) -> Path | None:
    """The loss curve of a run's ``log.jsonl`` (raw and a running mean of ``smooth`` points; the LR on a second
    axis) as a PNG. A step logged twice (a run killed after logging it, then resumed) counts once: the last entry.
    Returns None when the log has no loss yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries: dict[int, dict] = {}
    for line in Path(log_file).read_text().splitlines():
        try:
            e = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if "loss" in e:
            entries[int(e["step"])] = e
    if not entries:
        return None
    steps = sorted(entries)
    loss = np.array([entries[s]["loss"] for s in steps], dtype=np.float64)
    k = max(1, min(smooth, len(loss)))
    mean = np.convolve(loss, np.ones(k) / k, mode="valid")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, loss, lw=0.6, alpha=0.4, label="loss (logged)")
    ax.plot(steps[k - 1:], mean, lw=1.5, label=f"running mean of {k}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    if all("lr" in entries[s] for s in steps):
        lr_ax = ax.twinx()
        lr_ax.plot(steps, [entries[s]["lr"] for s in steps], c="gray", ls=":", lw=1, label="learning rate")
        lr_ax.set_ylabel("learning rate")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_image_grid(rows: list[list], path: str | os.PathLike) -> Path:
    """PIL images, one list per row (same length), pasted into one PNG (written atomically via a temp file)."""
    from ..pipelines import save_grid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    save_grid([im for row in rows for im in row], tmp.with_suffix(".png"), cols=len(rows[0]))
    os.replace(tmp.with_suffix(".png"), path)
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, fsync it, then ``os.replace`` it onto ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | os.PathLike, data: dict) -> Path:
    """``data`` as indented JSON at ``path``, via a temp file and ``os.replace`` (never half written)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# The pieces of a recipe's run that every recipe shares
# ---------------------------------------------------------------------------------------------------------------

def open_run_folder(folder: str | os.PathLike, result_names: Iterable[str], cfg: TrainingOptions, accelerator,
                    command: str) -> list[Path]:
    """Prepare the run folder on the main process (:func:`prepare_output_dir`), then return its checkpoints (oldest
    first) on every process. A ``--resume`` that finds none says so (``command``: the CLI's name) and starts at 0."""
    main = accelerator.is_main_process
    if main:
        prepare_output_dir(folder, result_names, cfg.overwrite, cfg.resume)
    accelerator.wait_for_everyone()
    checkpoints = checkpoint_dirs(folder)
    if cfg.resume and not checkpoints and main:
        print(f"{command}: no checkpoint in {folder}; starting from step 0")
    return checkpoints


def make_optimisation(params: list[torch.nn.Parameter], cfg: TrainingOptions, device: torch.device):
    """(AdamW, its LR schedule over ``max_steps``, the fp16 GradScaler or None, the non-finite guard) of a run."""
    optimizer = make_optimizer(params, cfg.optim)
    lr_scheduler = make_lr_scheduler(optimizer, cfg.optim, cfg.max_steps)
    return optimizer, lr_scheduler, make_grad_scaler(device, cfg.mixed_precision), NonFiniteGuard(cfg.max_nonfinite)


def resume_run(path: str | os.PathLike, optimizer, lr_scheduler, scaler, guard: NonFiniteGuard,
               must_match: dict[str, Any], load_weights: Callable[[dict, Any], None], stream, rank: int
               ) -> tuple[int, int]:
    """Continue from checkpoint ``path``: the training state (:func:`restore_training_state`, refusing other
    ``must_match`` settings), the weights (``load_weights(weights, path)``, the recipe's) and this process's data
    position in ``stream``. Returns (step, fp16 overflows so far)."""
    weights, state = load_checkpoint(path)
    step, position = restore_training_state(path, state, optimizer, lr_scheduler, scaler, guard, must_match, rank)
    load_weights(weights, path)
    stream.restore(*position)
    return step, int(state["fp16_overflow"])


def training_step(micro_loss: Callable[[int, int], torch.Tensor], step: int, cfg: TrainingOptions,
                  params: list[torch.nn.Parameter], optimizer, lr_scheduler, scaler, guard: NonFiniteGuard,
                  accelerator) -> StepOutcome:
    """Optimizer step ``step + 1`` (``step``: the steps done so far) over ``cfg.grad_accum`` micro-batches.

    ``micro_loss(step, micro)`` is the recipe's loss of micro-batch ``micro`` (its data and its draws); each is
    divided by their number and back-propagated (scaled under fp16), then :func:`optimizer_step` takes the step.
    """
    optimizer.zero_grad(set_to_none=True)
    micro_losses = []
    for micro in range(cfg.grad_accum):
        loss = micro_loss(step, micro) / cfg.grad_accum
        (scaler.scale(loss) if scaler is not None else loss).backward()
        micro_losses.append(loss.detach().float())
    return optimizer_step(params, micro_losses, optimizer, lr_scheduler, scaler, guard, accelerator,
                          cfg.optim.max_grad_norm, step + 1)


def save_run_checkpoint(out_dir: str | os.PathLike, step: int, weights: dict[str, dict[str, torch.Tensor]], optimizer,
                        lr_scheduler, scaler, guard: NonFiniteGuard, stream, accelerator,
                        config_writer: Callable[[Path], None], keep: int, **extra) -> None:
    """Checkpoint a run at ``step``: every process contributes its data position (``stream.state()``), the main
    process writes ``weights`` and :func:`training_state` (with ``extra``) atomically; all wait for it."""
    positions = data_positions(stream.state(), accelerator)
    if accelerator.is_main_process:
        state = training_state(step, optimizer, lr_scheduler, scaler, guard, positions, accelerator.num_processes,
                               **extra)
        save_checkpoint(out_dir, step, weights, state, config_writer, keep)
    accelerator.wait_for_everyone()


class RunProgress:
    """The bookkeeping of a recipe's loop: the step it stops at (``stop_at``, else ``max_steps``), the progress bar,
    the log lines (every ``log_every`` steps and at the stop), each step's loss and duration for the summary, and
    when a checkpoint or a validation grid is due. The bar and the log are the main process's only."""

    def __init__(self, cfg: TrainingOptions, log_dir: str | os.PathLike, desc: str, step: int, main: bool):
        from tqdm.auto import tqdm

        self.cfg = cfg
        self.logger = RunLogger(log_dir, enabled=main)
        self.stop = min(cfg.stop_at or cfg.max_steps, cfg.max_steps)
        self.bar = tqdm(total=cfg.max_steps, initial=step, desc=desc, disable=not (cfg.progress and main),
                        dynamic_ncols=True)
        self.losses: list[float] = []
        self.step_times: list[float] = []

    def record(self, step: int, outcome: StepOutcome, seconds: float, skipped: int, overflow: int) -> None:
        """Optimizer step ``step`` (1-based) is done: keep its loss and time, move the bar, log when due."""
        self.step_times.append(seconds)
        self.losses.append(outcome.loss)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{outcome.loss:.4g}", lr=f"{outcome.lr:.2g}")
        if step % self.cfg.log_every == 0 or step == self.stop:
            self.logger.log(step, {"loss": outcome.loss, "lr": outcome.lr, "grad_norm": outcome.grad_norm,
                                   "nonfinite_skipped": skipped, "fp16_overflow": overflow, "sec_per_step": seconds})

    def checkpoint_due(self, step: int) -> bool:
        return step % self.cfg.checkpoint_every == 0 or step == self.stop

    def validation_due(self, step: int) -> bool:
        return step == self.stop or bool(self.cfg.validate_every and step % self.cfg.validate_every == 0)

    def sec_per_step(self) -> float | None:
        """Median seconds per step of this run (None before any step), for the summary."""
        return float(np.median(self.step_times)) if self.step_times else None

    def close(self) -> None:
        self.bar.close()
        self.logger.close()


def check_same_weights(params: Iterable[torch.nn.Parameter], accelerator) -> tuple[list[float], bool]:
    """Every process's weight checksum (:func:`weights_checksums`) and whether they all agree; the main process
    refuses to write the result of processes that ended with different weights."""
    sums = weights_checksums(params, accelerator)
    consistent = all(s == sums[0] for s in sums)
    if accelerator.is_main_process and not consistent:
        raise LcmkitError(f"processes ended with different weights (checksums {sums}); please report this")
    return sums, consistent
