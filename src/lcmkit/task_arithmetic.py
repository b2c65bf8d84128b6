"""Task arithmetic with LoRAs (LCM-LoRA report, eqs. 2–3): merged into weights, fused for a while, or on the fly.

Each LoRA i is a task vector over the layers it touches (docs/reference.md, Task arithmetic):

    τ_i = (alpha_i / r_i) · up_i @ down_i            (conv: both factors flattened to 2-D, reshaped back)
    θ'  = θ_pre + Σ_i λ_i · τ_i                       (e.g. λ_style = 0.8, λ_LCM = 1.0; no training)

Three ways to get θ', which give the same outputs up to float32 rounding (tested):

- :func:`merge_loras` writes θ' into (copies of) the models (:func:`add_task_vectors_`): a float32 weight gets
  each λ_i τ_i added by one GEMM that accumulates into it (``addmm_``: no Δ tensor is formed); a weight of another
  dtype gets Σ λ_i τ_i summed in float32, added to its float32 value and cast back once. Layers whose λ is 0 are
  not touched at all, so λ = 0 leaves the base model bit for bit as it was (a copy of it).
- :func:`attach_loras` / :func:`apply_loras` leave the weights alone and add Σ λ_i (α_i/r_i) · up_i(down_i(x))
  to each layer's output with a forward hook (linear: two matmuls; conv: the down conv has the base layer's
  kernel, stride, padding and dilation, the up conv is 1x1). Removing the hooks restores the model exactly.
  Hooks work on any Linear/Conv2d whatever the file format was, and need neither PEFT nor diffusers' loaders.
- :func:`fuse_loras` / ``apply_loras(…, fuse=True)`` write θ' into the models' own weights in place (as
  :func:`merge_loras`, layer by layer) after saving a copy of each weight it changes; ``remove()`` (or leaving the
  ``with`` block, also on an exception) copies the saved tensors back, so the model is restored bit for bit.
  Sampling then costs what the base model costs (no extra matmuls per step); the touched weights are held twice
  meanwhile. This is how :func:`lcmkit.pipelines.generate` applies ``loras`` unless ``fuse_loras=False``.

:func:`apply_loras` reads LoRA files through :data:`lcmkit.lora_cache.LORA_CACHE`: a file already read (and checked)
against a model of the same layout, unchanged on disk since, is not read, converted or checked again.

A LoRA is given as ``(weights, λ)`` with ``weights`` a :data:`~lcmkit.lora_formats.LoraWeights` (read with
:func:`~lcmkit.lora_formats.load_lora`), or as ``(path, λ)`` / ``"FILE[:λ]"`` where a file is expected.
"""

from __future__ import annotations

import copy
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import LcmkitError
from .lora_cache import LORA_CACHE, CheckedLora
from .lora_checks import alpha_value, check_finite, check_lora_weight
from .lora_formats import (
    LoraLayer,
    LoraWeights,
    fit_to_module,
    lora_from_state_dict,
    pipeline_models,
    read_safetensors,
    split_name,
    unwrap,
)


def lora_delta(layer: LoraLayer, device: torch.device | str | None = None) -> Tensor:
    """τ = (alpha / r) · up @ down in float32 (on ``device``, default the factors'), shaped like the base weight:
    (out, in) or (out, in, kh, kw)."""
    down, up = layer.down.to(device, torch.float32), layer.up.to(device, torch.float32)
    delta = (up.flatten(1) @ down.flatten(1)).mul_(layer.scale)  # (out, r) @ (r, in·kh·kw), scaled in place
    return delta.reshape(up.shape[0], *down.shape[1:])


def touched_layers(loras: Sequence[tuple[LoraWeights, float]]) -> list[str]:
    """The layers some LoRA with λ ≠ 0 changes, in the order the LoRAs list them."""
    return list(dict.fromkeys(name for weights, lam in loras if lam != 0 for name in weights))


def layer_task_vector(loras: Sequence[tuple[LoraWeights, float]], name: str,
                      device: torch.device | str | None = None) -> Tensor:
    """Σ_i λ_i · τ_i for one layer ``name`` (one of :func:`touched_layers`), float32, summed in the LoRAs' order."""
    total = None
    for weights, lam in loras:
        if lam != 0 and name in weights:
            term = lora_delta(weights[name], device).mul_(lam)  # a fresh tensor: λ·τ in place, the same rounding
            total = term if total is None else total.add_(term)
    return total


def all_finite(t: Tensor) -> bool:
    """Whether every entry of a float tensor is finite: min and max propagate NaN and show ±inf, and cost a
    tenth of ``isfinite(t).all()``."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _overflow(name: str, weight: Tensor) -> LcmkitError:
    return LcmkitError(f"merging the LoRAs makes {name}.weight non-finite in {weight.dtype} (the sum overflows); "
                       "lower the LoRA weights λ")


def merged_weight(name: str, weight: Tensor, delta: Tensor) -> Tensor:
    """θ_pre + Σ λ_i τ_i for one layer: ``delta`` (float32) added to the float32 weight, cast back to the weight's
    dtype once. Raises :class:`LcmkitError` naming the layer when the result is not finite in that dtype."""
    merged = (weight.detach().float() + delta.to(weight.device).reshape(weight.shape)).to(weight.dtype)
    if not all_finite(merged):
        raise _overflow(name, weight)
    return merged


def add_task_vectors_(name: str, weight: Tensor, loras: Sequence[tuple[LoraWeights, float]]) -> None:
    """θ ← θ + Σ_i λ_i·(α_i/r_i)·up_i @ down_i for the layer ``name``, in place (report eq. 3).

    A float32 weight gets each term from one GEMM accumulating into it (``addmm_``): no Δ tensor, one pass over
    the weight per LoRA; on SD 1.5's UNet that is a quarter of forming Δ and adding it. A weight of another dtype
    (or not contiguous) gets :func:`merged_weight`: Σ λ_i τ_i in float32, cast once, checked before it is written.
    Raises :class:`LcmkitError` naming the layer when the result is not finite; a float32 weight has then been
    written, and the caller restores it (:class:`FusedLoras` saved it first).
    """
    if weight.dtype != torch.float32 or not weight.is_contiguous():
        weight.copy_(merged_weight(name, weight, layer_task_vector(loras, name, weight.device)))
        return
    flat = weight.view(weight.shape[0], -1)  # (out, in·kh·kw)
    for weights, lam in loras:
        if lam != 0 and name in weights:
            layer = weights[name]
            up, down = (f.to(weight.device, torch.float32).flatten(1) for f in (layer.up, layer.down))
            flat.addmm_(up, down, alpha=lam * layer.scale)  # θ += λ·(α/r)·(out, r) @ (r, in·kh·kw)
    if not all_finite(weight):
        raise _overflow(name, weight)


def check_weights_fit(weights: LoraWeights, models: Mapping[str, nn.Module]) -> None:
    """Raise :class:`LcmkitError` naming the first layer of ``weights`` that is not in ``models``, does not fit, or
    holds a non-finite number."""
    for name, layer in weights.items():
        check_finite(layer.down, f"{name} down", "LoRA")
        check_finite(layer.up, f"{name} up", "LoRA")
        alpha_value(layer.alpha, f"LoRA layer {name}: alpha")
        component, path = split_name(name)
        if component not in models:
            raise LcmkitError(f"LoRA layer {name} is for {component}, which this model does not have")
        try:
            module = models[component].get_submodule(path)
        except AttributeError:
            raise LcmkitError(f"LoRA layer {name} matches no module of this model") from None
        fit_to_module(name, layer.down, layer.up, module)


def update_bounds(weights: LoraWeights) -> dict[str, tuple[float, float, float]]:
    """Per layer (|α/r|·r·max|up|·max|down|, max|up|, max|down|): no entry of τ = (α/r)·up@down exceeds the first
    (each is a sum of r products), so λ·τ stays within float32 when |λ| times it does."""
    out = {}
    for name, layer in weights.items():
        up, down = float(layer.up.abs().max()), float(layer.down.abs().max())
        out[name] = (abs(layer.scale) * layer.rank * up * down, up, down)
    return out


def check_update(lam: float, bounds: Mapping[str, tuple[float, float, float]]) -> None:
    """Raise naming the first layer whose update λ·(α/r)·up@down could leave float32 (``bounds``:
    :func:`update_bounds`)."""
    limit = float(torch.finfo(torch.float32).max)
    for name, (unit, up, down) in bounds.items():
        if abs(lam) * unit > limit:
            raise LcmkitError(f"LoRA layer {name}: its update reaches {abs(lam) * unit:.3g}, past float32's range "
                              f"(factors of size {up:.3g} and {down:.3g}); the file is damaged")


def check_loras(loras: Sequence[tuple[LoraWeights, float]], models: Mapping[str, nn.Module]) -> None:
    """Every (weights, λ) pair: λ finite and in range, every layer finite, fitting ``models``, and with an update
    λ·(α/r)·up@down that cannot overflow float32 (each entry is at most r·max|up|·max|down| times the scale)."""
    for i, (weights, lam) in enumerate(loras):
        check_lora_weight(lam, f"the weight λ of LoRA {i + 1}")
        check_weights_fit(weights, models)
        check_update(lam, update_bounds(weights))


def merge_loras(models: Mapping[str, nn.Module], loras: Sequence[tuple[LoraWeights, float]], *,
                inplace: bool = False) -> dict[str, nn.Module]:
    """θ' = θ_pre + Σ λ_i τ_i (report eq. 3) for ``models`` = ``{"unet": …, "text_encoder": …}``.

    Returns ``{component: model}``: a merged deep copy for every component a LoRA with λ ≠ 0 touches and the
    original object for the others (``inplace=True`` merges into the originals instead, saving a copy's
    memory). Each layer as :func:`add_task_vectors_`, the same code as :func:`fuse_loras`, so a fuse gives these
    weights bit for bit. A merged weight that is not finite in its dtype (an fp16 overflow) raises naming the
    layer, with every weight put back: never a half-merged model.
    """
    check_loras(loras, models)
    touched = {split_name(name)[0] for name in touched_layers(loras)}
    out = {c: (m if inplace or c not in touched else copy.deepcopy(m)) for c, m in models.items()}
    _fuse_checked(out, loras).keep()
    return out


def merge_into_pipeline(pipe, loras: Sequence[tuple[LoraWeights, float]], *, inplace: bool = False):
    """:func:`merge_loras` over a pipeline's UNet and text encoders; with ``inplace=False`` the pipeline gets
    merged copies (its previous models are left untouched for other references). Returns ``pipe``."""
    merged = merge_loras(pipeline_models(pipe), loras, inplace=inplace)
    for component, model in merged.items():
        setattr(pipe, component, model)
    return pipe


# ---------------------------------------------------------------------------------------------------------------
# On the fly: forward hooks
# ---------------------------------------------------------------------------------------------------------------

def lora_forward(module: nn.Module, x: Tensor, down: Tensor, up: Tensor) -> Tensor:
    """up(down(x)) for one layer, without the scale: the low-rank branch of ``module`` applied to its input."""
    if isinstance(module, nn.Conv2d):
        h = F.conv2d(x, down, None, module.stride, module.padding, module.dilation)
        return F.conv2d(h, up)
    return F.linear(F.linear(x, down), up)


@dataclass
class _Branch:
    """The LoRA branches of one module: [(down, up, λ·α/r)], factors in the module's dtype and device."""

    module: nn.Module
    terms: list[tuple[Tensor, Tensor, float]] = field(default_factory=list)

    def __call__(self, module, inputs, output):
        x = inputs[0]
        for down, up, coef in self.terms:
            down, up = down.to(x.device, x.dtype), up.to(x.device, x.dtype)  # no-ops unless the model moved
            output = output + coef * lora_forward(module, x, down, up)
        return output


class AppliedLoras:
    """Forward hooks adding LoRA branches to a model's layers; ``remove()`` (or leaving the ``with`` block)
    restores it exactly. ``layers`` counts hooked modules, ``names`` lists them."""

    def __init__(self, handles: list, names: list[str]):
        self._handles = handles
        self.names = names

    @property
    def layers(self) -> int:
        return len(self.names)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def attach_loras(models: Mapping[str, nn.Module], loras: Sequence[tuple[LoraWeights, float]]) -> AppliedLoras:
    """Apply Σ λ_i τ_i on the fly (forward hooks) to ``models`` = ``{"unet": …, "text_encoder": …}``; same
    outputs as :func:`merge_loras` up to float32 rounding. LoRAs with λ = 0 attach nothing."""
    check_loras(loras, models)
    return _attach_checked(models, loras)


def _attach_checked(models: Mapping[str, nn.Module], loras: Sequence[tuple[LoraWeights, float]]) -> AppliedLoras:
    """:func:`attach_loras` for LoRAs :func:`check_loras` (or :func:`load_lora_specs`) already checked."""
    branches: dict[str, _Branch] = {}
    for weights, lam in loras:
        if lam == 0:
            continue
        for name, layer in weights.items():
            component, path = split_name(name)
            module = unwrap(models[component].get_submodule(path))
            down, up = fit_to_module(name, layer.down, layer.up, module)
            ref = module.weight
            branch = branches.setdefault(name, _Branch(module))
            branch.terms.append((down.to(ref.device, ref.dtype), up.to(ref.device, ref.dtype), lam * layer.scale))
    handles = [b.module.register_forward_hook(b) for b in branches.values()]
    return AppliedLoras(handles, list(branches))


# ---------------------------------------------------------------------------------------------------------------
# Fused for a while: merged in place, the saved weights copied back
# ---------------------------------------------------------------------------------------------------------------

#: Weights some :class:`FusedLoras` holds merged right now: a second fuse of one of them could be undone in the
#: wrong order (each restores what it saved), so :func:`apply_loras` attaches hooks instead.
#: id(weight) -> a weak reference to it (tensors compare element-wise, so no WeakSet).
_FUSED: dict[int, weakref.ref] = {}


class FusedLoras(AppliedLoras):
    """LoRAs merged into a model's own weights; ``remove()`` (or leaving the ``with`` block) copies the saved
    original of every changed weight back, bit for bit. ``layers`` counts changed layers, ``names`` lists them.
    The originals are kept on the CPU, so fusing does not hold the touched weights twice in GPU memory."""

    def __init__(self, names: list[str]):
        super().__init__([], names)
        self._saved: dict[int, tuple[Tensor, Tensor]] = {}  # id(weight) -> (weight, its original values)

    def _fuse(self, models: Mapping[str, nn.Module], loras: Sequence[tuple[LoraWeights, float]]) -> None:
        with torch.no_grad():
            for name in self.names:
                component, path = split_name(name)
                weight = unwrap(models[component].get_submodule(path)).weight
                if id(weight) not in self._saved:
                    self._saved[id(weight)] = (weight, weight.detach().to("cpu", copy=True))
                    _FUSED[id(weight)] = weakref.ref(weight)
                add_task_vectors_(name, weight, loras)  # an overflow raises: fuse_loras restores every weight

    def keep(self) -> None:
        """Keep the merged weights for good (:func:`merge_loras`): the saved originals are dropped, nothing is
        restored."""
        for weight, _ in self._saved.values():
            _FUSED.pop(id(weight), None)
        self._saved = {}

    def remove(self) -> None:
        with torch.no_grad():
            for weight, original in self._saved.values():
                weight.copy_(original.to(weight.device))
                _FUSED.pop(id(weight), None)
        self._saved = {}


def fused_now(models: Mapping[str, nn.Module], names: Iterable[str]) -> bool:
    """Whether a weight of the layers ``names`` is held merged by a live :class:`FusedLoras`."""
    def held(weight: Tensor) -> bool:
        ref = _FUSED.get(id(weight))
        return ref is not None and ref() is weight

    return any(held(unwrap(models[c].get_submodule(p)).weight) for c, p in map(split_name, names))


def fuse_loras(models: Mapping[str, nn.Module], loras: Sequence[tuple[LoraWeights, float]]) -> FusedLoras:
    """θ' = θ_pre + Σ λ_i (α_i/r_i) up_i @ down_i written in place into ``models`` = ``{"unet": …, …}`` until
    ``remove()`` / the end of the ``with`` block, which copies the saved originals back (never subtracts).

    Every LoRA is checked (:func:`check_loras`) before any weight changes. Then layer by layer: a copy of the
    weight saved, Σ λ_i τ_i added in place on the weight's device (:func:`add_task_vectors_`). A layer that
    overflows its dtype raises after restoring every layer. Only weights some LoRA with λ ≠ 0 touches are changed
    or copied.
    """
    check_loras(loras, models)
    return _fuse_checked(models, loras)


def _fuse_checked(models: Mapping[str, nn.Module], loras: Sequence[tuple[LoraWeights, float]]) -> FusedLoras:
    """:func:`fuse_loras` for LoRAs :func:`check_loras` (or :func:`load_lora_specs`) already checked."""
    fused = FusedLoras(touched_layers(loras))
    try:
        fused._fuse(models, loras)
    except BaseException:
        fused.remove()
        raise
    return fused


def read_checked(path: str | os.PathLike, models: Mapping[str, nn.Module]) -> CheckedLora:
    """A LoRA file read against ``models`` (:func:`~lcmkit.lora_formats.load_lora`), every layer checked to fit
    them and be finite, with its update bounds; not cached (:func:`load_lora_specs` caches)."""
    state, metadata = read_safetensors(path)  # against every model the pipeline has (a UNet or a transformer)
    weights = lora_from_state_dict(state, models, metadata, source=f"LoRA file {path}")
    check_weights_fit(weights, models)
    return CheckedLora(weights, update_bounds(weights))


def load_lora_specs(models: Mapping[str, nn.Module], specs: Iterable) -> list[tuple[LoraWeights, float]]:
    """Read every ``(file, λ)`` / ``"FILE[:λ]"`` against ``models`` and check it (:func:`check_loras`); all files
    are checked before any is used. A file read before against a model of this layout and unchanged since comes
    from :data:`~lcmkit.lora_cache.LORA_CACHE` instead of being read, converted and checked again."""
    from .pipelines import parse_lora  # the CLI's FILE[:WEIGHT] syntax, one definition

    out = []
    for i, (path, lam) in enumerate(map(parse_lora, specs)):
        check_lora_weight(lam, f"the weight λ of LoRA {i + 1}")
        entry = LORA_CACHE.get_or_read(path, models, lambda p: read_checked(p, models))
        check_update(lam, entry.bounds)
        out.append((entry.weights, lam))
    return out


def apply_loras(pipe, loras: Iterable, *, fuse: bool = False) -> AppliedLoras:
    """Apply LoRA files to a pipeline: ``loras`` = ``[(path, λ), …]`` or ``"FILE[:λ]"`` strings; on the fly with
    forward hooks (:func:`attach_loras`), or with ``fuse=True`` merged into the weights in place (:func:`fuse_loras`)
    unless another fuse still holds one of the same weights (then hooks: they stack exactly in any order).

    Every file is read key by key (any format, see :mod:`lcmkit.lora_formats`) and checked against the
    pipeline's UNet and text encoders before anything is attached or merged. Use as a context manager
    (``with apply_loras(pipe, loras): …``) or call ``.remove()``; the pipeline is then exactly as before.
    """
    models = pipeline_models(pipe)
    weights = load_lora_specs(models, loras)  # checked
    if fuse and not fused_now(models, touched_layers(weights)):
        return _fuse_checked(models, weights)
    return _attach_checked(models, weights)  # hooks stack in any order, so overlapping uses stay exact


# ---------------------------------------------------------------------------------------------------------------
# Merged into a saved pipeline (lcmkit lora combine)
# ---------------------------------------------------------------------------------------------------------------

#: Written into every combined folder: what was merged, so the output documents itself.
PROVENANCE_FILE = "lcmkit_lora_combine.json"


def check_out_dir(out: str | os.PathLike, overwrite: bool) -> None:
    """Refuse a non-empty ``out`` without ``overwrite``; with it, only replace what is a pipeline folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LcmkitError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise LcmkitError(f"--out {out} is not empty; choose another folder or pass --overwrite")
        if not (out / "model_index.json").is_file():
            raise LcmkitError(f"--out {out} is not empty and is not a pipeline folder (no model_index.json); "
                              "refusing to delete it even with --overwrite")


def combine(base: str | os.PathLike, loras: Iterable, out: str | os.PathLike, overwrite: bool = False) -> dict:
    """θ' = θ_pre + Σ λ_i·τ_i merged into the pipeline folder ``base`` and saved, atomically, as a pipeline folder of
    the same class at ``out``. ``loras``: ``"FILE[:λ]"`` strings or (file, λ) pairs; every file is checked before the
    base loads and every LoRA against the base before any merge. Returns the provenance record written beside the
    model (:data:`PROVENANCE_FILE`: base, files, λ, layers per LoRA)."""
    from .atomic import atomic_folder, write_json
    from .lora_formats import check_safetensors_file
    from .pipelines import load_pipeline, parse_lora

    check_out_dir(out, overwrite)
    specs = [parse_lora(s) for s in loras]
    for path, _ in specs:  # refuse missing files and pickles before the (slow) base model loads
        check_safetensors_file(path)
    pipe = load_pipeline(base, device="cpu")
    weights = load_lora_specs(pipeline_models(pipe), specs)  # every file checked before any merge
    merge_into_pipeline(pipe, weights, inplace=True)
    record = {
        "base": str(base), "pipeline_class": type(pipe).__name__,
        "formula": "theta' = theta_pre + sum_i lambda_i * (alpha_i / r_i) * up_i @ down_i",
        "loras": [{"file": str(path), "lambda": lam, "layers": len(w)} for (path, lam), (w, _) in zip(specs, weights)],
    }

    def write(folder: Path) -> None:
        pipe.save_pretrained(str(folder), safe_serialization=True)
        write_json(folder / PROVENANCE_FILE, record, indent=2)

    atomic_folder(out, write)
    return record
