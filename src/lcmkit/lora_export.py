"""A trained LoRA written as the files people load: the kohya-keyed file that ComfyUI, Forge, AUTOMATIC1111 and
kohya's sd-scripts apply whole, and diffusers' file, in the precision asked for, readable by other users.

Which client reads what (from their loaders' source; docs/lora-formats.md):

- **kohya** (``lora_unet_<module path, "." → "_">.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, alpha a
  per-layer tensor: the one form all four clients read, alpha included). Its UNet names are the ones sd-scripts
  writes for the architecture: diffusers module paths for SD 1.x/2.x (``lora_unet_down_blocks_1_attentions_0_
  proj_in``) and the original SGM block names for SDXL (``lora_unet_input_blocks_4_1_proj_in``), because
  AUTOMATIC1111 maps SDXL's ``up_blocks.0.upsamplers.0.conv`` by the SD 1.x rule and drops it, and sd-scripts'
  SDXL UNet is named that way.
- **diffusers** (``unet.<path>.lora_A.weight`` / ``lora_B.weight``, alphas in the header config): what
  ``pipe.load_lora_weights(folder)`` reads. ComfyUI and Forge drop its attention projections (they expect
  ``processor.to_q``) and ignore the header alpha; AUTOMATIC1111 and sd-scripts match none of its keys.
- **peft** (``base_model.model.<path>.lora_A.weight``): for peft's own loaders.
- **comfyui**: the file ComfyUI applies whole, alpha included. For a UNet LoRA that is the kohya file. For a flow
  transformer's LoRA (SD3 / SD3.5, FLUX.1): ``transformer.<path>.lora_A.weight`` / ``.lora_B.weight`` and a float32
  ``transformer.<path>.alpha`` per layer. ComfyUI maps these diffusers module names onto SD3's and FLUX's original
  (fused q/k/v, fused linear1) weights for every layer lcmkit adapts, but reads alpha only from ``.alpha`` tensors
  (never from the header: without one it applies scale 1). diffusers' ``FluxPipeline`` reads this file too;
  ``StableDiffusion3Pipeline`` refuses keys without "lora" in them, so diffusers users of SD3 take the diffusers
  file. kohya names for transformers (sd-scripts' fused ``double_blocks_0_img_attn_qkv``) are not written.

The kohya file is written by lcmkit itself, not by ``diffusers.utils.convert_state_dict_to_kohya``: that converter
stores alpha = rank for every layer (the true alpha is lost when they differ) and knows no SGM block names.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from .errors import LcmkitError
from .lora_formats import FORMATS, LoraLayer, LoraWeights, save_lora, split_name

#: what ``--lora-format`` writes unless told otherwise: the file every client applies whole, and diffusers' file
DEFAULT_LORA_FORMATS = "kohya,diffusers"
#: the same for a flow transformer's LoRA (no kohya names): diffusers' file, and ComfyUI's with alpha tensors
DEFAULT_FLOW_LORA_FORMATS = "diffusers,comfyui"
#: what ``--lora-format`` may name: the layouts :mod:`lcmkit.lora_formats` reads and writes, and ``comfyui``
#: (transformer LoRAs; written here)
WRITE_FORMATS = FORMATS + ("comfyui",)
#: ``--save-dtype`` → the dtype of the LoRA factors (kohya's alphas stay float32 scalars)
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_formats(spec: str | tuple | list) -> tuple[str, ...]:
    """``"kohya,diffusers"`` → ``("kohya", "diffusers")``; each of :data:`WRITE_FORMATS` at most once."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    formats = tuple(dict.fromkeys(str(n).strip().lower() for n in names if str(n).strip()))
    unknown = [f for f in formats if f not in WRITE_FORMATS]
    if not formats or unknown:
        raise LcmkitError(f"lora_format {spec!r}: give a comma list of {', '.join(WRITE_FORMATS)} (default "
                          f"{DEFAULT_LORA_FORMATS}; flow transformers: {DEFAULT_FLOW_LORA_FORMATS})")
    return formats


def check_save_dtype(name: str) -> torch.dtype:
    if name not in SAVE_DTYPES:
        raise LcmkitError(f"save_dtype must be one of {', '.join(SAVE_DTYPES)}, got {name!r}")
    return SAVE_DTYPES[name]


def output_paths(path: str | os.PathLike, formats) -> dict[str, Path]:
    """Where each format goes: the diffusers file at ``path`` (else the first format named), every other one
    beside it as ``<stem>_<format>.safetensors``."""
    path = Path(path)
    formats = parse_formats(formats)
    main = "diffusers" if "diffusers" in formats else formats[0]
    return {f: path if f == main else path.with_name(f"{path.stem}_{f}.safetensors") for f in formats}


def kohya_bases(weights: LoraWeights, unet: nn.Module | None) -> dict[str, str]:
    """kohya key bases of the UNet layers of ``weights`` by SGM block name when ``unet`` is SDXL (as sd-scripts
    names them); {} otherwise (diffusers module paths, as sd-scripts names SD 1.x/2.x layers)."""
    from .denoisers import architecture
    from .lora_sgm import original_names

    if unet is None or architecture(unet) != "sdxl":
        return {}
    original = original_names(unet)
    bases = {}
    for name in weights:
        component, path = split_name(name)
        if component != "unet":
            continue
        if path not in original:
            raise LcmkitError(f"LoRA layer {name} has no original SGM name, so no kohya key ComfyUI, "
                              "AUTOMATIC1111 and sd-scripts all read; write it with --lora-format diffusers")
        bases[name] = "lora_unet_" + original[path].replace(".", "_")
    return bases


def is_transformer_lora(weights: LoraWeights) -> bool:
    """True for a flow transformer's LoRA (every layer ``transformer.…``), False for UNet / text-encoder layers;
    a file mixing the two has no layout every client reads, and is refused."""
    components = {split_name(n)[0] for n in weights}
    if "transformer" in components and len(components) > 1:
        raise LcmkitError(f"a LoRA with transformer and {', '.join(sorted(components - {'transformer'}))} layers "
                          "has no single file layout; save them separately")
    return components == {"transformer"}


def comfyui_state_dict(weights: LoraWeights) -> dict[str, torch.Tensor]:
    """A transformer LoRA as ComfyUI reads it: ``transformer.<path>.lora_A.weight`` (down), ``.lora_B.weight`` (up)
    and ``.alpha`` (float32 scalar) per layer (module docstring)."""
    if not weights or not is_transformer_lora(weights):
        raise LcmkitError("the transformer.* comfyui layout needs transformer LoRA layers (SD3, FLUX)")
    tensors = {}
    for name, layer in weights.items():
        tensors[f"{name}.lora_A.weight"] = layer.down
        tensors[f"{name}.lora_B.weight"] = layer.up
        tensors[f"{name}.alpha"] = torch.tensor(layer.alpha, dtype=torch.float32)
    return tensors


def _save_comfyui(weights: LoraWeights, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = comfyui_state_dict(weights)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def write_lora_files(weights: LoraWeights, path: str | os.PathLike, formats=DEFAULT_LORA_FORMATS,
                     unet: nn.Module | None = None, save_dtype: str = "fp32") -> dict[str, Path]:
    """Write ``weights`` once per format (see :func:`output_paths`), factors in ``save_dtype``, each file atomically
    and readable by other users. ``unet``: the model the LoRA is for (SDXL gets SGM-named kohya keys). Returns
    ``{format: path}``."""
    from .atomic import atomic_write  # which also gives each file the umask's mode (0644 under 022)

    dtype = check_save_dtype(save_dtype)
    cast = {n: LoraLayer(layer.down.detach().to("cpu", dtype).contiguous(),
                         layer.up.detach().to("cpu", dtype).contiguous(), layer.alpha) for n, layer in weights.items()}
    # lcmkit's own kohya writer: diffusers' convert_state_dict_to_kohya stores alpha = rank and knows no SGM names
    transformer = is_transformer_lora(cast)
    if transformer and "kohya" in parse_formats(formats):  # refused before any file is written
        raise LcmkitError("no kohya key convention for transformer LoRA layers; write the diffusers or comfyui "
                          "format")
    kohya_named = {"kohya", "comfyui"} & set(parse_formats(formats)) and not transformer
    bases = kohya_bases(cast, unet) if kohya_named else {}
    written = {}
    for fmt, target in output_paths(path, formats).items():
        if fmt == "comfyui" and transformer:
            atomic_write(target, lambda tmp: _save_comfyui(cast, tmp))
        elif fmt == "comfyui":  # a UNet LoRA: ComfyUI applies the kohya file whole
            atomic_write(target, lambda tmp: save_lora(cast, tmp, "kohya", bases))
        else:
            atomic_write(target, lambda tmp, fmt=fmt: save_lora(cast, tmp, fmt, bases if fmt == "kohya" else None))
        written[fmt] = target
    return written


def save_options(cfg) -> Mapping:
    """The save options of a recipe config (``lora_format``, ``save_dtype``) as :func:`write_lora_files` keywords."""
    return {"formats": cfg.lora_format, "save_dtype": cfg.save_dtype}
