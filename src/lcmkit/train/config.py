"""Training configs: typed dataclasses built from defaults, a YAML file and command-line overrides.

:func:`build_config` turns YAML (flat or nested by section) + CLI overrides into a recipe's config dataclass (the
command line wins); unknown keys are errors that name the nearest known key. :func:`save_config` writes the resolved
config (YAML) next to every checkpoint and output. :class:`TrainingOptions` holds the options every recipe shares
and checks them (:meth:`TrainingOptions.check_training`); :class:`OptimConfig` is its AdamW + schedule section.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import write_text
from ..errors import LcmkitError
from .data import check_data_spec
from .runtime import MIXED_PRECISION

CONFIG_FILE = "config.yaml"
#: keys of older configs → their names now (a saved config.yaml keeps working with --config)
RENAMED = {"world_samples": "generated_samples"}
LR_SCHEDULES = ("constant", "cosine")


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
        key = RENAMED.get(key, key)
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
    return write_text(Path(folder) / CONFIG_FILE, yaml.safe_dump(data, sort_keys=False))


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule, in optimizer steps (not micro-batches, not per-process steps)."""

    # typed settings, one per line: alike in shape to other configs, not logic to share
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


@dataclass
class TrainingOptions:
    """The options every lcmkit training recipe shares (data, loop, checkpoints, validation, precision, AdamW).

    ``DistillConfig``, ``FinetuneConfig`` and ``StyleLoraConfig`` add their own fields to these; YAML keys and CLI
    flags (:func:`lcmkit.commands._training.add_training_args`) have the same names (``-`` for ``_``).
    """

    data: str = ""                    # imagefolder (metadata.jsonl), webdataset shards, or a generated dataset
    resolution: int | None = None     # pixels; default the model's native size
    crop: str = "center"              # center or random
    flip: bool = False                # random horizontal flip (off: captions may say left/right)
    caption_key: str = "text"         # imagefolder caption column
    generated_samples: int = 10000    # size of a generated dataset (its images 0 … n−1 of seed ``seed``)
    cache_latents: bool = False       # encode every image once up front (needs crop=center, no flip)
    cache_text: bool | None = None    # encode every caption once up front; default: on for generated datasets
    batch_size: int = 8               # per process, per micro-batch
    grad_accum: int = 1
    max_steps: int = 1000             # optimizer steps; the LR schedule spans these
    stop_at: int | None = None        # stop (with a checkpoint) after this step, schedule unchanged; for --resume
    mixed_precision: str = "no"       # no, fp16, bf16
    gradient_checkpointing: bool = False
    seed: int = 0                     # data order, generated images, every training draw, LoRA init
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
        check_data_spec(self.data)
        if self.resolution is not None and self.resolution < 8:
            raise LcmkitError(f"resolution must be >= 8 pixels, got {self.resolution}")
        if self.crop not in ("center", "random"):
            raise LcmkitError(f"crop must be center or random, got {self.crop!r}")
        if self.cache_latents and (self.crop != "center" or self.flip):
            raise LcmkitError("cache_latents needs crop=center and flip off (a cached latent cannot be "
                              "re-augmented); drop --cache-latents or the augmentation")
        for name in ("batch_size", "grad_accum", "max_steps", "generated_samples", "checkpoint_every", "log_every"):
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
class ConsistencyOptions(TrainingOptions):
    """The options both consistency recipes share (distillation, Algorithm 1; fine-tuning, Algorithm 4): the target
    EMA, the ω draws, the skipping step k, the distance d and the LCM validation grids."""

    ema: float = 0.95                 # μ of the target θ⁻ (full mode); 0 = target is a copy of θ
    omega: float | None = None        # fixed paper ω (diffusers guidance_scale − 1) instead of a range
    omega_min: float | None = None    # default 5 (SD) / 3 (SDXL)
    omega_max: float | None = None    # default 15
    skip: int = 20                    # skipping step k
    loss: str = "huber"               # l2 (paper) or huber (pseudo-Huber)
    huber_c: float = 0.001
    validation_steps: list[int] = field(default_factory=lambda: [1, 2, 4])
    validation_omega: float = 7.0     # ω of the full LCM's w-embedding in validation grids

    def check_consistency(self) -> None:
        """Check the shared options; each recipe's ``__post_init__`` calls this after :meth:`check_training`."""
        from ..losses import LOSS_TYPES

        if not 0.0 <= self.ema < 1.0:
            raise LcmkitError(f"ema must be in [0, 1) (0.95 is the reference; 0 = no EMA), got {self.ema}")
        if self.omega is not None and (self.omega_min is not None or self.omega_max is not None):
            raise LcmkitError("give either a fixed --omega or --omega-min/--omega-max, not both")
        for name in ("omega", "omega_min", "omega_max", "validation_omega"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise LcmkitError(f"{name} must be a finite number >= 0 (paper ω = guidance_scale − 1), got {v}")
        if self.omega_min is not None and self.omega_max is not None and self.omega_min > self.omega_max:
            raise LcmkitError(f"omega_min {self.omega_min} > omega_max {self.omega_max}; swap them")
        if self.skip < 1:
            raise LcmkitError(f"skip k must be >= 1 (20 is the reference), got {self.skip}")
        if self.loss not in LOSS_TYPES:
            raise LcmkitError(f"loss must be one of {', '.join(LOSS_TYPES)}, got {self.loss!r}")
        if self.huber_c <= 0:
            raise LcmkitError(f"huber_c must be > 0 (0.001 is the reference), got {self.huber_c}")
        if not self.validation_steps or any(s < 1 for s in self.validation_steps):
            raise LcmkitError(f"validation_steps must be positive step counts, got {self.validation_steps}")


@dataclass
class LoraSaveOptions:
    """How a recipe writes the LoRA it trains (``distill --mode lora``, ``lora train``, ``finetune --lora``):
    :func:`lcmkit.lora_export.write_lora_files`."""

    lora_format: str = "kohya,diffusers"  # comma list of kohya, diffusers, peft: one file each
    save_dtype: str = "fp32"              # the LoRA factors' dtype: fp32, fp16 or bf16

    def check_lora_save(self) -> None:
        from ..lora_export import check_save_dtype, parse_formats

        parse_formats(self.lora_format)
        check_save_dtype(self.save_dtype)
