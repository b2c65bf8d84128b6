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
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import write_text
from ..errors import LcmkitError
from .data import check_data_spec, check_prompts
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
        if key in sections:
            if not isinstance(value, dict):
                raise LcmkitError(f"{source}: {key} must be a section (a mapping of its options), got {_show(value)}")
            flat.update(_flatten(value, sections[key], f"{source} section {key!r}"))
            continue
        if key not in keys:
            near = difflib.get_close_matches(key, list(keys), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; known keys: {', '.join(sorted(keys))}"
            raise LcmkitError(f"unknown option {key!r} in {source}{hint}")
        flat[key] = value
    return flat


#: a config file larger than this, or nested deeper, is refused unread (a config is a few dozen lines)
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 16
#: YAML 1.2 floats PyYAML (YAML 1.1) reads as strings: an exponent without a dot or without a sign (1e-4, 1.0e5)
_FLOAT_12 = r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"


class _Refused(Exception):
    """Raised inside the YAML loader; becomes one line naming the file."""


def _yaml_loader():
    """PyYAML's safe loader, numbers read as people write them (``lr: 1e-4`` is a float), and refusing what no
    config needs: anchors and aliases (a few hundred bytes of ``&a [*a, *a, ...]`` expand to gigabytes), nesting
    deeper than :data:`MAX_CONFIG_DEPTH`, and a key given twice (the first one would be silently dropped)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent, index):
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise _Refused(f"it uses a YAML anchor or alias (line {event.start_mark.line + 1}), which lcmkit does "
                               "not read; write the values out")
            self.depth += 1
            if self.depth > MAX_CONFIG_DEPTH:
                raise _Refused(f"it is nested deeper than {MAX_CONFIG_DEPTH} levels")
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

        def compose_mapping_node(self, anchor):
            node = super().compose_mapping_node(anchor)
            seen = set()
            for key, _ in node.value:
                if isinstance(key, yaml.ScalarNode):
                    if key.value in seen:
                        raise _Refused(f"it sets {key.value!r} twice (line {key.start_mark.line + 1})")
                    seen.add(key.value)
            return node

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(_FLOAT_12), list("-+0123456789."))
    return Loader


def load_yaml(path: str | os.PathLike) -> dict:
    """A config file as a dict: UTF-8, at most :data:`MAX_CONFIG_BYTES`, read by :func:`_yaml_loader`; anything
    else is one line naming the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise LcmkitError(f"config file {path} not found" if not path.exists() else
                          f"config file {path} is not a regular file")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise LcmkitError(f"config file {path} is {size} bytes; lcmkit reads configs of at most "
                          f"{MAX_CONFIG_BYTES >> 20} MiB")
    try:
        text = path.read_bytes()[:MAX_CONFIG_BYTES].decode("utf-8")
    except UnicodeDecodeError as e:
        raise LcmkitError(f"config file {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                          f"{e.start}); save it as UTF-8") from e
    try:
        data = yaml.load(text, Loader=_yaml_loader())
    except _Refused as e:
        raise LcmkitError(f"config file {path} is refused: {e}") from e
    except (yaml.YAMLError, RecursionError) as e:
        raise LcmkitError(f"config file {path} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LcmkitError(f"config file {path} must hold a mapping of option: value, got {type(data).__name__}")
    return data


def _show(value, limit: int = 60) -> str:
    """A value in an error message: ``default`` for None, repr cut to ``limit`` characters."""
    if value is None:
        return "default"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _field_types(cls) -> dict[str, Any]:
    """Every settable key of ``cls`` (as :func:`config_keys`) → its type annotation."""
    hints, sections = typing.get_type_hints(cls), _sections(cls)
    found = {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name not in sections}
    for sub in sections.values():
        found.update(_field_types(sub))
    return found


def _quoted_number(value) -> str:
    """A hint for a number written in quotes (``lr: "1e-4"``), which YAML reads as a string."""
    try:
        float(value) if isinstance(value, str) else None
    except ValueError:
        return ""
    return " (a number in quotes is text to YAML: drop the quotes)" if isinstance(value, str) else ""


def _typed(key: str, value, hint, source: str):
    """``value`` checked against the annotation ``hint`` of field ``key`` (ints from integral floats, floats from
    ints; never a bool for a number, a string for a number, inf/NaN for an int), or one line naming the field."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        kinds = [a for a in args if a is not type(None)]
        hint = kinds[0] if len(kinds) == 1 else None
        if hint is None:
            return value
        origin, args = typing.get_origin(hint), typing.get_args(hint)

    def bad(what: str):
        got = "an empty value" if value is None else _show(value)
        return LcmkitError(f"{source}: {key} must be {what}, got {got}{_quoted_number(value)}")

    if hint is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        raise bad("a whole number")
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        if not math.isfinite(value):
            raise bad("a finite number")
        return float(value)
    if hint is str:
        if isinstance(value, os.PathLike):  # a library caller's Path
            return os.fspath(value)
        if not isinstance(value, str):
            raise bad("text" + (" (quote it: YAML reads yes/no/on/off as true/false)" if isinstance(value, bool)
                                else ""))
        return value
    if origin in (list, tuple) and args:
        if not isinstance(value, (list, tuple)):
            raise bad("a list (one entry per line, each '- value'), not a single value")
        return [_typed(f"{key}[{i}]", v, args[0], source) for i, v in enumerate(value)]
    return value


def build_config(cls, yaml_path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None):
    """``cls`` from defaults ← YAML file ← ``overrides`` (CLI; entries that are None are ignored).

    Validation happens in the dataclasses' ``__post_init__`` and raises :class:`LcmkitError`.
    """
    raw = load_yaml(yaml_path) if yaml_path else {}
    raw.pop(RESOLVED_KEY, None)  # what save_config wrote for the record: derived values, not settings
    hints = _field_types(cls)
    source = f"config file {yaml_path}"
    flat = {k: _typed(k, v, hints[k], source) for k, v in _flatten(raw, cls, source).items()} if yaml_path else {}
    cli = _flatten({k: v for k, v in (overrides or {}).items() if v is not None}, cls, "the command line")
    flat.update({k: _typed(k, v, hints[k], "the command line") for k, v in cli.items()})
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


#: settings a --resume may change: where, how often and how far, not what each step computes (``max_steps`` too:
#: continuing a run for longer is what a resume is for; a cosine schedule then spans the new length)
RESUME_FREE = frozenset({
    "out", "run_dir", "resume", "overwrite", "allow_changed_recipe", "stop_at", "max_steps", "device", "progress",
    "checkpoint_every", "keep_checkpoints", "validate_every", "validation_prompts", "validation_seed",
    "validation_steps", "validation_omega", "validation_guidance", "log_every", "max_nonfinite", "cache_latents",
    "cache_text", "gradient_checkpointing", "lora_format", "save_dtype"})
#: settings the checkpoint's tensors are laid out by: no resume can change them, even with --allow-changed-recipe
RESUME_FIXED = ("mode", "lora_rank", "lora_alpha", "lora_ema", "lora_targets")


def _flat_values(data: dict, cls) -> dict[str, Any]:
    """A saved or current config as {key: value}, sections flattened, unknown keys kept (no errors: for comparing)."""
    sections, flat = _sections(cls), {}
    for key, value in data.items():
        key = RENAMED.get(str(key).replace("-", "_"), str(key).replace("-", "_"))
        if key in sections and isinstance(value, dict):
            flat.update(_flat_values(value, sections[key]))
        else:
            flat[key] = value
    return flat


def _same(a, b) -> bool:
    """Equal settings: equal values, equal lists, or two spellings of one existing path."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str) and (os.path.exists(a) or os.path.exists(b)):
        return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))
    return False


def resume_changes(cfg, resolved: dict, checkpoint: str | os.PathLike) -> dict[str, tuple[Any, Any]]:
    """The recipe fields of ``cfg`` that differ from those the ``checkpoint`` was made with (its config.yaml):
    {field: (checkpoint's value, this run's)}. Refused (:class:`LcmkitError` naming every changed field) unless
    ``cfg.allow_changed_recipe``; a :data:`RESUME_FIXED` field is refused always. A field left to its default on one
    side and given on the other is the same when the values the runs derived from it (``resolved``) agree.
    A checkpoint without a config.yaml (older lcmkit) has nothing to compare: {}."""
    saved_file = Path(checkpoint) / CONFIG_FILE
    if not saved_file.is_file():
        return {}
    try:
        saved = load_yaml(saved_file)
    except LcmkitError as e:
        raise LcmkitError(f"checkpoint {checkpoint} is damaged ({e}); delete it to resume from the one before") from e
    saved_resolved = saved.pop(RESOLVED_KEY, None)
    saved_resolved = saved_resolved if isinstance(saved_resolved, dict) else {}
    old, new = _flat_values(saved, type(cfg)), _flat_values(config_to_dict(cfg), type(cfg))
    changes = {}
    for key, value in new.items():
        if key in RESUME_FREE or key not in old or _same(old[key], value):
            continue
        if key in resolved and key in saved_resolved and _same(resolved[key], saved_resolved[key]):
            continue  # e.g. resolution: the model's native size by default then, given explicitly now
        changes[key] = (old[key], value)
    listed = ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in changes.items())
    fixed = [k for k in RESUME_FIXED if k in changes]
    if fixed:
        raise LcmkitError(f"checkpoint {checkpoint} cannot be resumed with another {', '.join(fixed)} ({listed}): its "
                          "tensors are laid out by it; resume with the checkpoint's settings or start a new --out")
    if changes and not cfg.allow_changed_recipe:
        raise LcmkitError(f"--resume with a changed recipe: {listed} (checkpoint {checkpoint} was made with the first "
                          "values); resume with the same settings, or pass --allow-changed-recipe to continue with "
                          "the new ones (recorded in logs/resumes.jsonl)")
    return changes


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
    allow_changed_recipe: bool = False  # --resume may continue with another recipe (recorded in logs/resumes.jsonl)
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
        from ..single_file import check_model_path

        check_model_path(getattr(self, model_key), model_key)  # a pipeline folder or a single-file checkpoint
        check_data_spec(self.data)
        check_prompts(self.validation_prompts)
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
    omega_min: float | None = None    # default 5 (SD) / 3 (SDXL) / 2.5 (SD3) / 1 (FLUX.1-dev)
    omega_max: float | None = None    # default 15 (SD3, FLUX with true CFG: 6; FLUX.1-dev: 4)
    skip: int = 20                    # skipping step k
    loss: str = "huber"               # l2 (paper) or huber (pseudo-Huber)
    huber_c: float = 0.001
    validation_steps: list[int] = field(default_factory=lambda: [1, 2, 4])
    validation_omega: float | None = None  # ω in validation grids: a full LCM's w-embedding (default 7);
    #                                        FLUX.1-dev's embedded g = ω + 1 (default: the middle of the ω range)

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

    lora_format: str | None = None   # comma list of kohya, diffusers, peft, comfyui: one file each (default
    #                                  kohya,diffusers; flow teachers' LoRAs: diffusers,comfyui)
    save_dtype: str = "fp32"              # the LoRA factors' dtype: fp32, fp16 or bf16

    def check_lora_save(self, resolve: bool = True) -> None:
        """Check the formats and dtype; no ``lora_format`` given becomes ``kohya,diffusers`` (``resolve=False``:
        left to the recipe, as distillation resolves it by the teacher's kind)."""
        from ..lora_export import DEFAULT_LORA_FORMATS, check_save_dtype, parse_formats

        if self.lora_format is None and resolve:
            self.lora_format = DEFAULT_LORA_FORMATS
        if self.lora_format is not None:
            parse_formats(self.lora_format)
        check_save_dtype(self.save_dtype)
