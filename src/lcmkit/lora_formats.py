"""LoRA files in the formats users bring (kohya, PEFT, diffusers, and files that mix them), read key by key
into one canonical structure, and written back in any of the three.

Canonical structure (:data:`LoraWeights`): ``{"<component>.<module path>": LoraLayer(down, up, alpha)}``, where
component is ``unet``, ``text_encoder`` or ``text_encoder_2`` and the module path is the REAL name of the layer in
the model it was loaded against (``unet.get_submodule(path)`` works). Shapes, as PEFT and kohya store them:

- linear ``nn.Linear(in, out)``: down (r, in), up (out, r)
- conv ``nn.Conv2d(in, out, (kh, kw))``: down (r, in, kh, kw) (same stride/padding as the base conv), up (out, r, 1, 1)

and the layer adds ``(alpha / r) · up @ down`` to the base weight (conv: with both factors flattened to 2-D).

Conventions:

- **Alpha is always kept.** kohya stores it per layer (``<name>.alpha``); diffusers and PEFT keep it in the
  LoRA config, which we read from the safetensors header (``lora_adapter_metadata``: ``lora_alpha`` and
  ``alpha_pattern``, optionally prefixed by the component, as diffusers writes it) or from ``<module>.alpha``
  tensors. A layer with no alpha anywhere gets **alpha = rank** (scale 1), the convention of diffusers and PEFT
  files saved without a config. Alphas are held as float32-representable values (kohya stores float32 tensors),
  so conversions round-trip exactly.
- **Key by key.** Every key is classified on its own (diffusers decides from the first key only and silently
  drops the layers of a mixed file; lcmkit-reference section 8). A key that is no LoRA key we know, that names
  no Linear/Conv2d of the model, or whose tensors do not fit that layer raises :class:`LcmkitError` naming the
  key. Nothing is dropped silently.
- **kohya names** (``lora_unet_down_blocks_0_attentions_0_proj_in``) lost their dots, and real module names
  contain underscores (``to_out.0``, ``ff.net.0.proj``, ``conv_shortcut``), so they are mapped back through a
  table built from the model's own ``named_modules()``, never by string guessing. UNet keys may also use the
  original LDM/SGM block names (``lora_unet_input_blocks_4_1_proj_in``, as sd-scripts writes SDXL LoRAs and
  ComfyUI/AUTOMATIC1111 accept for SD 1.x): the table holds those spellings too (:mod:`lcmkit.lora_sgm`).
- **Plain LoRA only, checked first** (:mod:`lcmkit.lora_checks`): LyCORIS LoHa/LoKr/GLoRA, IA3, OFT, DoRA and
  weight-difference files are refused by name before anything is resolved; LoCon (LoRA on convolutions, with an
  optional ``lora_mid`` core, folded exactly into ``down``) is read. Every tensor and alpha must be finite, every
  rank ≥ 1, every header alpha a number.
- **CLIP text encoders**: transformers ≥ 5 flattened ``CLIPTextModel`` (``encoder.layers.0…``) while files
  and ``CLIPTextModelWithProjection`` say ``text_model.encoder.layers.0…``. Reading accepts both; writing uses
  the ``text_model.`` form every tool reads.
- **Safety**: safetensors only. ``.ckpt/.bin/.pt/.pth/.pkl`` files and any file whose first bytes are a pickle
  or a zip (``torch.save``) are refused before anything is parsed; ``torch.load`` is never called on user files.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from .errors import LcmkitError
from .lora_checks import (  # noqa: F401  (check_safetensors_file, read_safetensors, PICKLE_SUFFIXES: re-exported)
    PICKLE_SUFFIXES,
    alpha_value,
    check_finite,
    check_rank,
    check_safetensors_file,
    read_safetensors,
    refuse_other_adapters,
)

#: the denoisers a LoRA adapts (a UNet, or the transformer of a flow pipeline: SD3) and the CLIP text encoders
DENOISERS = ("unet", "transformer")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
COMPONENTS = (DENOISERS[0], *TEXT_ENCODERS, DENOISERS[1])
FORMATS = ("diffusers", "peft", "kohya")
#: Header key diffusers uses for its LoRA config (``lora_base.LORA_ADAPTER_METADATA_KEY``); we use it for PEFT too.
METADATA_KEY = "lora_adapter_metadata"

_KOHYA_PREFIX = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}


@dataclass(frozen=True)
class LoraLayer:
    """One low-rank update: ``ΔW = (alpha / rank) · up @ down`` (shapes in the module docstring)."""

    down: Tensor
    up: Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


#: ``"<component>.<module path>" -> LoraLayer``, module paths as in the model the file was loaded against.
LoraWeights = dict[str, LoraLayer]


def float32_value(x: float) -> float:
    """``x`` rounded to the nearest float32, as a Python float (how alphas are held; kohya stores float32)."""
    return float(torch.tensor(float(x), dtype=torch.float32))


def split_name(name: str) -> tuple[str, str]:
    """``"unet.down_blocks.0.x"`` → ``("unet", "down_blocks.0.x")``."""
    component, _, path = name.partition(".")
    return component, path


def pipeline_models(pipe) -> dict[str, nn.Module]:
    """The LoRA-able models of a diffusers SD-family pipeline: ``{"unet": …, "text_encoder": …, ...}`` (an SD3
    pipeline: ``{"transformer": …, "text_encoder": …, "text_encoder_2": …}``)."""
    return {c: getattr(pipe, c) for c in COMPONENTS if getattr(pipe, c, None) is not None}


def models_dict(unet: nn.Module, text_encoders=None) -> dict[str, nn.Module]:
    """``unet`` plus text encoders given as a sequence (``[te]`` or ``[te1, te2]``) or a ``{component: model}``
    mapping → ``{"unet": unet, "text_encoder": te1, "text_encoder_2": te2}``."""
    models = {"unet": unet}
    if isinstance(text_encoders, Mapping):
        models.update({k: v for k, v in text_encoders.items() if v is not None})
    elif text_encoders is not None:
        if isinstance(text_encoders, nn.Module):
            text_encoders = [text_encoders]
        models.update({c: m for c, m in zip(TEXT_ENCODERS, text_encoders) if m is not None})
    return models


# ---------------------------------------------------------------------------------------------------------------
# Key parsing: one key → where it points and what it holds (no model needed)
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KeyRef:
    """A parsed LoRA key. ``names`` are candidate module paths (tried in order against the model), or for kohya
    the underscore name; ``component`` is None when the key does not say (bare PEFT/diffusers keys)."""

    key: str
    fmt: str               # "kohya" | "peft" | "diffusers"
    component: str | None
    names: tuple[str, ...]
    role: str              # "down" | "up" | "mid" (LoCon's core) | "alpha"

    @property
    def raw_path(self) -> str:
        """The module path as written in the file (for matching config patterns)."""
        return self.names[0]


_KOHYA = re.compile(r"^lora_(unet|te|te1|te2)_([A-Za-z0-9_]+)\.(lora_down\.weight|lora_up\.weight|lora_mid\.weight|alpha)$")
_KOHYA_ANY = re.compile(r"^lora_(unet|te|te1|te2)_[A-Za-z0-9_]+\.")
_PEFT_PREFIX = "base_model.model."
# a PEFT/diffusers LoRA factor: lora_A / lora_B, optionally with an adapter name (lora_A.default.weight)
_AB = re.compile(r"^(?P<path>.+?)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[A-Za-z0-9_-]+))?\.weight$")
# older diffusers layouts: LoRACompatible layers (.lora.down) and text-encoder lora_linear_layer
_OLD = re.compile(r"^(?P<path>.+?)\.(?:lora|lora_linear_layer)\.(?P<du>down|up)\.weight$")
# attention-processor era: <attn>[.processor].to_q_lora.down.weight
_PROC = re.compile(r"^(?P<parent>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<du>down|up)\.weight$")
_PROC_ALPHA = re.compile(r"^(?P<parent>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.alpha$")
#: processor-era projection → (UNet attention name, CLIP attention name)
_PROC_TARGETS = {"to_q": ("to_q", "q_proj"), "to_k": ("to_k", "k_proj"), "to_v": ("to_v", "v_proj"),
                 "to_out": ("to_out.0", "out_proj")}


def parse_kohya_key(key: str) -> KeyRef | None:
    """``lora_unet_<name>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (``lora_te_``, ``lora_te1_``,
    ``lora_te2_`` for text encoders), and LoCon's ``.lora_mid.weight``. Other kohya-looking keys raise."""
    m = _KOHYA.match(key)
    if m is None:
        if _KOHYA_ANY.match(key):
            raise LcmkitError(f"LoRA key {key!r} is a kohya key lcmkit does not support (only plain LoRA / LoCon: "
                              "lora_down, lora_up, lora_mid, alpha)")
        return None
    prefix, name, what = m.groups()
    role = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid", "alpha": "alpha"}[what]
    return KeyRef(key, "kohya", _KOHYA_PREFIX[prefix], (name,), role)


def _split_component(path: str) -> tuple[str | None, str]:
    for c in sorted(COMPONENTS, key=len, reverse=True):  # text_encoder_2 before text_encoder
        if path.startswith(c + "."):
            return c, path[len(c) + 1:]
    return None, path


def _parse_module_key(key: str, rest: str, fmt: str, component: str | None) -> KeyRef | None:
    """The part after the prefix: ``<path>.lora_A.weight`` & co., older diffusers layouts, ``<path>.alpha``."""
    if m := _AB.match(rest):
        return KeyRef(key, fmt, component, (m["path"],), "down" if m["ab"] == "A" else "up")
    if m := _PROC.match(rest):
        names = tuple(f"{m['parent']}.{t}" for t in _PROC_TARGETS[m["proj"]])
        return KeyRef(key, fmt, component, names, m["du"])
    if m := _OLD.match(rest):
        return KeyRef(key, fmt, component, (m["path"],), m["du"])
    if m := _PROC_ALPHA.match(rest):
        names = tuple(f"{m['parent']}.{t}" for t in _PROC_TARGETS[m["proj"]])
        return KeyRef(key, fmt, component, names, "alpha")
    if rest.endswith(".alpha"):
        return KeyRef(key, fmt, component, (rest[: -len(".alpha")],), "alpha")
    return None


def parse_key(key: str) -> KeyRef:
    """Classify one key (kohya, PEFT ``base_model.model.…``, diffusers ``unet.…``/``text_encoder.…`` or bare
    module paths); raise naming the key when it is none of them."""
    ref = parse_kohya_key(key)
    if ref is None and key.startswith(_PEFT_PREFIX):
        component, rest = _split_component(key[len(_PEFT_PREFIX):])
        ref = _parse_module_key(key, rest, "peft", component)
    elif ref is None:
        component, rest = _split_component(key)
        ref = _parse_module_key(key, rest, "diffusers", component)
    if ref is None:
        hint = ""
        if "magnitude" in key or "dora" in key:
            hint = " (DoRA is not supported)"
        elif ".lora_B.bias" in key or "lora_embedding" in key:
            hint = " (LoRA biases and embedding LoRAs are not supported)"
        raise LcmkitError(f"LoRA key {key!r} is not a LoRA key lcmkit understands{hint}: expected kohya "
                          "(lora_unet_*.lora_down.weight), PEFT (base_model.model.*.lora_A.weight) or diffusers "
                          "(unet.*.lora_A.weight / .lora.down.weight) keys")
    return ref


# ---------------------------------------------------------------------------------------------------------------
# Resolving a key against the real module names of the model
# ---------------------------------------------------------------------------------------------------------------

def _text_model_aliases(path: str) -> list[str]:
    """CLIP text models are named with or without ``text_model.`` depending on the transformers version."""
    if path.startswith("text_model."):
        return [path, path[len("text_model."):]]
    return [path, "text_model." + path]


class ModuleIndex:
    """Real module names of one model, plus kohya's underscore spelling of each, and for a UNet of its original
    LDM/SGM name (ambiguous spellings kept apart so that a key hitting one raises instead of picking a layer at
    random)."""

    def __init__(self, component: str, model: nn.Module):
        from .lora_sgm import original_names

        self.component = component
        self.modules = dict(model.named_modules())
        self.kohya: dict[str, str] = {}
        self.ambiguous: dict[str, list[str]] = {}
        is_text = component in TEXT_ENCODERS
        original = original_names(model) if component == "unet" else {}
        for name in self.modules:
            if not name:
                continue
            spellings = {name.replace(".", "_")}
            if is_text:
                spellings |= {a.replace(".", "_") for a in _text_model_aliases(name)}
            elif name in original:
                spellings.add(original[name].replace(".", "_"))
            for s in spellings:
                if s in self.kohya and self.kohya[s] != name:
                    self.ambiguous.setdefault(s, [self.kohya[s]]).append(name)
                self.kohya.setdefault(s, name)

    def find(self, ref: KeyRef) -> str | None:
        """The real module path ``ref`` points to in this model, or None."""
        if ref.fmt == "kohya":
            name = ref.names[0]
            if name in self.ambiguous:
                raise LcmkitError(f"LoRA key {ref.key!r} is ambiguous in {self.component}: "
                                  f"{' / '.join(self.ambiguous[name])}")
            return self.kohya.get(name)
        for candidate in ref.names:
            aliases = _text_model_aliases(candidate) if self.component in TEXT_ENCODERS else [candidate]
            for path in aliases:
                if path in self.modules:
                    return path
        return None


def unwrap(module: nn.Module) -> nn.Module:
    """The plain Linear/Conv2d inside a layer another LoRA library already wrapped (peft keeps it as
    ``base_layer``); a hook or merge on it adds to whatever the wrapper adds."""
    while hasattr(module, "base_layer") and isinstance(module.base_layer, nn.Module):
        module = module.base_layer
    return module


def resolve(ref: KeyRef, indexes: Mapping[str, ModuleIndex]) -> str:
    """``"<component>.<real module path>"`` for a parsed key; raises naming the key when it matches nothing."""
    if ref.component is not None:
        if ref.component not in indexes:
            raise LcmkitError(f"LoRA key {ref.key!r} is for {ref.component}, which this model does not have "
                              f"(it has: {', '.join(indexes)})")
        found = {ref.component: indexes[ref.component].find(ref)}
    else:  # bare key: whichever model has that module; ambiguity is an error, not a guess
        found = {c: index.find(ref) for c, index in indexes.items()}
    found = {c: p for c, p in found.items() if p is not None}
    if not found:
        hint = ""
        if ref.fmt == "kohya" and re.match(r"(input_blocks|middle_block|output_blocks)_", ref.names[0]):
            hint = " (an original-layout LDM/SGM block name, but not one of this UNet's blocks)"
        raise LcmkitError(f"LoRA key {ref.key!r} matches no module of this model{hint}; is the LoRA for "
                          "another base model?")
    if len(found) > 1:
        raise LcmkitError(f"LoRA key {ref.key!r} names a module that exists in "
                          f"{' and '.join(found)}; write the key with its component (e.g. text_encoder_2.…)")
    (component, path), = found.items()
    return f"{component}.{path}"


# ---------------------------------------------------------------------------------------------------------------
# Alphas from the LoRA config in the header
# ---------------------------------------------------------------------------------------------------------------

def parse_lora_metadata(metadata: Mapping[str, str]) -> dict:
    """The JSON LoRA config stored under :data:`METADATA_KEY` in a safetensors header, or {}."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LcmkitError(f"the LoRA config in the file header is not valid JSON: {e}") from e
    return config if isinstance(config, dict) else {}


@functools.lru_cache(maxsize=8192)  # one compile per pattern, not per (pattern, layer): files hold ~1000 of them
def _pattern_regex(pattern: str) -> re.Pattern | None:
    try:
        return re.compile(rf"(.*\.)?({pattern})$")
    except re.error:
        return None


def _pattern_matches(pattern: str, path: str) -> bool:
    """PEFT's rule for ``alpha_pattern`` keys: the pattern matches a dotted suffix of the module path."""
    regex = _pattern_regex(pattern)
    return regex is not None and regex.match(path) is not None


def alpha_from_config(config: Mapping, ref: KeyRef) -> float | None:
    """The alpha the LoRA config gives for the module of ``ref``: ``alpha_pattern`` (exact key first, then
    PEFT's suffix-regex rule), else ``lora_alpha``; keys may carry a component prefix (``unet.lora_alpha``)
    as diffusers writes them. None when the config says nothing."""
    prefixes = ([f"{ref.component}."] if ref.component else []) + [""]
    # the path as written, and with its component in front (a PEFT file holding several models says
    # base_model.model.text_encoder.<path>)
    paths = list(ref.names) + ([f"{ref.component}.{n}" for n in ref.names] if ref.component else [])
    for prefix in prefixes:
        patterns = config.get(prefix + "alpha_pattern") or {}
        if not isinstance(patterns, Mapping):
            raise LcmkitError(f"the LoRA config's {prefix}alpha_pattern must map module names to numbers, got "
                              f"{patterns!r}")
        where = f"alpha of {ref.key!r} in the LoRA config's {prefix}alpha_pattern"
        for path in paths:  # as written, or escaped as lcmkit writes patterns: no regex scan needed
            for exact in (path, re.escape(path)):
                if exact in patterns:
                    return alpha_value(patterns[exact], where)
        for pattern, value in patterns.items():
            if any(_pattern_matches(pattern, p) for p in paths):
                return alpha_value(value, where)
        if config.get(prefix + "lora_alpha") is not None:
            return alpha_value(config[prefix + "lora_alpha"], f"the LoRA config's {prefix}lora_alpha")
    return None


# ---------------------------------------------------------------------------------------------------------------
# Checking that a layer fits its module
# ---------------------------------------------------------------------------------------------------------------

def fit_to_module(key: str, down: Tensor, up: Tensor, module: nn.Module) -> tuple[Tensor, Tensor]:
    """Check (and, for 1x1 convs vs linears, reshape) the factors against the module; raise naming ``key``.

    A 1x1 ``Conv2d`` may arrive with 2-D factors and a ``Linear`` with (·, ·, 1, 1) factors (SD 1.x's proj_in
    is a 1x1 conv, SD 2.x's a linear): those are reshaped, as they are the same map.
    """
    module = unwrap(module)
    check_rank(key, down)
    if down.ndim not in (2, 4) or up.ndim not in (2, 4) or down.shape[0] != up.shape[1]:
        raise LcmkitError(f"LoRA key {key!r}: down {tuple(down.shape)} and up {tuple(up.shape)} do not form a "
                          "low-rank pair")
    if isinstance(module, nn.Linear):
        if down.ndim == 4 and down.shape[2:] == (1, 1):
            down = down.flatten(1)
        if up.ndim == 4 and up.shape[2:] == (1, 1):
            up = up.flatten(1)
        want_down, want_up = (down.shape[0], module.in_features), (module.out_features, up.shape[1])
    elif isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros":
            raise LcmkitError(f"LoRA key {key!r}: grouped or non-zero-padded convolutions are not supported")
        if down.ndim == 2 and tuple(module.kernel_size) == (1, 1):
            down = down[:, :, None, None]
        if up.ndim == 2:
            up = up[:, :, None, None]
        want_down = (down.shape[0], module.in_channels, *module.kernel_size)
        want_up = (module.out_channels, up.shape[1], 1, 1)
    else:
        raise LcmkitError(f"LoRA key {key!r} targets a {type(module).__name__}; LoRA applies to Linear and Conv2d "
                          "layers only")
    if tuple(down.shape) != tuple(want_down) or tuple(up.shape) != tuple(want_up):
        raise LcmkitError(f"LoRA key {key!r} does not fit this model: down {tuple(down.shape)}, up "
                          f"{tuple(up.shape)}, the layer needs {tuple(want_down)} and {tuple(want_up)}; is the "
                          "LoRA for another base model?")
    return down, up


# ---------------------------------------------------------------------------------------------------------------
# State dict → LoraWeights
# ---------------------------------------------------------------------------------------------------------------

def lora_from_state_dict(state: Mapping[str, Tensor], models: Mapping[str, nn.Module],
                         metadata: Mapping[str, str] | None = None, source: str = "LoRA") -> LoraWeights:
    """Convert a LoRA state dict in any (mix of) format(s) to :data:`LoraWeights`, key by key, against
    ``models`` (``{"unet": …, "text_encoder": …}``). Raises :class:`LcmkitError` naming the first bad key."""
    if not state:
        raise LcmkitError(f"{source} contains no tensors")
    refuse_other_adapters(state, source)  # a LoHa/LoKr/... file is refused whole, never half-applied
    indexes = {c: ModuleIndex(c, m) for c, m in models.items()}
    config = parse_lora_metadata(metadata or {})
    parts: dict[str, dict[str, tuple[KeyRef, Tensor]]] = {}
    for key, tensor in state.items():
        check_finite(tensor, key, source)
        ref = parse_key(key)
        target = resolve(ref, indexes)
        slot = parts.setdefault(target, {})
        if ref.role in slot:
            raise LcmkitError(f"{source}: LoRA keys {slot[ref.role][0].key!r} and {key!r} both define the "
                              f"{ref.role} of {target}")
        slot[ref.role] = (ref, tensor)

    weights: LoraWeights = {}
    for target, slot in parts.items():
        missing = [r for r in ("down", "up") if r not in slot]
        if missing:
            ref = next(iter(slot.values()))[0]
            raise LcmkitError(f"{source}: LoRA key {ref.key!r} has no matching {missing[0]} weight for {target}")
        (down_ref, down), (_, up) = slot["down"], slot["up"]
        if "mid" in slot:
            down = fold_mid(slot["mid"][0].key, slot["mid"][1], down)
        component, path = split_name(target)
        down, up = fit_to_module(down_ref.key, down, up, models[component].get_submodule(path))
        if "alpha" in slot:
            alpha = alpha_value(slot["alpha"][1], f"{source}: alpha tensor {slot['alpha'][0].key!r}")
        else:
            try:
                alpha = alpha_from_config(config, down_ref)
            except LcmkitError as e:
                raise LcmkitError(f"{source}: {e}") from None
            if alpha is None:
                alpha = float(down.shape[0])  # no alpha anywhere: alpha = rank, scale 1
        weights[target] = LoraLayer(down.contiguous(), up.contiguous(), float32_value(alpha))
    return weights


def fold_mid(key: str, mid: Tensor, down: Tensor) -> Tensor:
    """LoCon's CP core folded into ``down``: a 1x1 ``down`` (r, in) followed by the kh×kw ``mid`` (r, r, kh, kw)
    is one kh×kw conv with kernel Σ_j mid[:, j] · down[j] (r, in, kh, kw), the same map exactly."""
    square = mid.ndim == 4 and down.shape[0] == mid.shape[0] == mid.shape[1]
    if not square or (down.ndim == 4 and tuple(down.shape[2:]) != (1, 1)):
        raise LcmkitError(f"LoRA key {key!r}: lora_mid {tuple(mid.shape)} does not fit lora_down "
                          f"{tuple(down.shape)} (LoCon's core is (rank, rank, kh, kw) after a 1x1 down)")
    return torch.einsum("ojhw,ji->oihw", mid.float(), down.float().flatten(1)).to(down.dtype)


def load_lora(path: str | os.PathLike, unet: nn.Module, text_encoders=None) -> LoraWeights:
    """Read a LoRA ``.safetensors`` file (kohya, PEFT, diffusers or a mix) for ``unet`` (+ text encoders: a
    sequence ``[te1, te2]`` or ``{"text_encoder": …}``) into :data:`LoraWeights`.

    Refuses pickles (by name and content); raises :class:`LcmkitError` naming the first key that is not a LoRA
    key, matches no Linear/Conv2d of the models, or does not fit its layer's shape.
    """
    state, metadata = read_safetensors(path)
    return lora_from_state_dict(state, models_dict(unet, text_encoders), metadata, source=f"LoRA file {path}")


# ---------------------------------------------------------------------------------------------------------------
# LoraWeights → files
# ---------------------------------------------------------------------------------------------------------------

def public_path(component: str, path: str) -> str:
    """The module path written to files: text-encoder paths in the ``text_model.…`` form all tools read."""
    if component in TEXT_ENCODERS and path.startswith("encoder."):
        return "text_model." + path
    return path


def _config(layers: Mapping[str, LoraLayer], paths: Mapping[str, str]) -> dict:
    """A PEFT ``LoraConfig``-style dict: most common rank/alpha, patterns for every module that differs.

    ``paths``: canonical name → path as written in the file (the patterns are those paths, matched by PEFT's
    dotted-suffix rule, so ``encoder.layers…`` also matches a model that says ``text_model.encoder.layers…``).
    """
    r = Counter(layer.rank for layer in layers.values()).most_common(1)[0][0]
    alpha = Counter(layer.alpha for layer in layers.values()).most_common(1)[0][0]
    return {
        "r": r, "lora_alpha": alpha,
        "rank_pattern": {re.escape(paths[n]): layer.rank for n, layer in layers.items() if layer.rank != r},
        "alpha_pattern": {re.escape(paths[n]): layer.alpha for n, layer in layers.items() if layer.alpha != alpha},
        "target_modules": sorted(paths[n] for n in layers),
    }


def _by_component(weights: LoraWeights) -> dict[str, dict[str, LoraLayer]]:
    out: dict[str, dict[str, LoraLayer]] = {}
    for name, layer in weights.items():
        out.setdefault(split_name(name)[0], {})[name] = layer
    return out


def to_state_dict(weights: LoraWeights, fmt: str = "diffusers",
                  kohya_bases: Mapping[str, str] | None = None) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, safetensors header) of ``weights`` in ``fmt``; every format carries every alpha.

    - ``diffusers``: ``<component>.<path>.lora_A.weight`` / ``lora_B.weight``; alphas in the header config that
      ``pipe.load_lora_weights`` reads (``unet.lora_alpha``, ``unet.alpha_pattern`` …; text-encoder patterns
      without ``text_model.`` so they match CLIP models of either transformers generation).
    - ``peft``: ``base_model.model.<path>.lora_A.weight`` for UNet layers (``base_model.model.<component>.<path>``
      for text encoders, so nothing is ambiguous), alphas in a PEFT config in the header.
    - ``kohya``: ``lora_unet_<path_with_underscores>.lora_down.weight`` / ``lora_up.weight`` / ``.alpha``
      (float32 scalar); text encoders ``lora_te_`` (``lora_te1_``/``lora_te2_`` when a second one is present).
      ``kohya_bases`` (canonical name → key base) names layers otherwise, e.g. by their SGM block names
      (:func:`lcmkit.lora_export.kohya_bases`).
    """
    if fmt not in FORMATS:
        raise LcmkitError(f"unknown LoRA format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not weights:
        raise LcmkitError("no LoRA layers to save")
    groups = _by_component(weights)
    tensors: dict[str, Tensor] = {}
    header: dict[str, str] = {"format": "pt"}
    if fmt == "kohya":
        te_prefix = {"text_encoder": "te1" if "text_encoder_2" in groups else "te", "text_encoder_2": "te2",
                     "unet": "unet"}
        if other := sorted(set(groups) - set(te_prefix)):  # e.g. "transformer": no kohya naming for it here
            raise LcmkitError(f"no kohya key convention for {', '.join(other)} LoRA layers; write the diffusers or "
                              "comfyui format")
        for name, layer in weights.items():
            component, path = split_name(name)
            default = f"lora_{te_prefix[component]}_{public_path(component, path).replace('.', '_')}"
            base = (kohya_bases or {}).get(name, default)
            tensors[base + ".lora_down.weight"] = layer.down
            tensors[base + ".lora_up.weight"] = layer.up
            tensors[base + ".alpha"] = torch.tensor(layer.alpha, dtype=torch.float32)
        return tensors, header

    written: dict[str, str] = {}  # canonical name -> module path as written (before .lora_A.weight)
    if fmt == "diffusers":
        config: dict = {}
        for component, layers in groups.items():
            paths = {n: public_path(component, split_name(n)[1]) for n in layers}
            written.update({n: f"{component}.{p}" for n, p in paths.items()})
            patterns = {n: p.removeprefix("text_model.") for n, p in paths.items()}
            config.update({f"{component}.{k}": v for k, v in _config(layers, patterns).items()})
    else:
        for name in weights:
            component, path = split_name(name)
            written[name] = ("" if component == "unet" else f"{component}.") + public_path(component, path)
        config = {**_config(weights, written), "peft_type": "LORA"}
        written = {n: _PEFT_PREFIX + w for n, w in written.items()}
    for name, w in written.items():
        tensors[w + ".lora_A.weight"] = weights[name].down
        tensors[w + ".lora_B.weight"] = weights[name].up
    header[METADATA_KEY] = json.dumps(config, sort_keys=True)
    return tensors, header


def save_lora(weights: LoraWeights, path: str | os.PathLike, fmt: str = "diffusers",
              kohya_bases: Mapping[str, str] | None = None) -> Path:
    """Write ``weights`` to a ``.safetensors`` file in ``fmt`` (``diffusers`` | ``peft`` | ``kohya``), alphas
    included; see :func:`to_state_dict` for the layouts. The file gets the umask's mode (safetensors makes it 0600:
    :func:`lcmkit.atomic.make_readable`). Returns the path."""
    from safetensors.torch import save_file

    from .atomic import make_readable

    path = Path(path)
    if path.suffix != ".safetensors":
        raise LcmkitError(f"LoRA files are written as .safetensors, got {path.name}")
    tensors, header = to_state_dict(weights, fmt, kohya_bases)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=header)
    make_readable(path)
    return path
