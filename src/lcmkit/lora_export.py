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
#: ``--save-dtype`` → the dtype of the LoRA factors (kohya's alphas stay float32 scalars)
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_formats(spec: str | tuple | list) -> tuple[str, ...]:
    """``"kohya,diffusers"`` → ``("kohya", "diffusers")``; each of :data:`~lcmkit.lora_formats.FORMATS` at most once."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    formats = tuple(dict.fromkeys(str(n).strip().lower() for n in names if str(n).strip()))
    unknown = [f for f in formats if f not in FORMATS]
    if not formats or unknown:
        raise LcmkitError(f"lora_format {spec!r}: give a comma list of {', '.join(FORMATS)} (default "
                          f"{DEFAULT_LORA_FORMATS})")
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
    bases = kohya_bases(cast, unet) if "kohya" in parse_formats(formats) else {}
    written = {}
    for fmt, target in output_paths(path, formats).items():
        atomic_write(target, lambda tmp, fmt=fmt: save_lora(cast, tmp, fmt, bases if fmt == "kohya" else None))
        written[fmt] = target
    return written


def save_options(cfg) -> Mapping:
    """The save options of a recipe config (``lora_format``, ``save_dtype``) as :func:`write_lora_files` keywords."""
    return {"formats": cfg.lora_format, "save_dtype": cfg.save_dtype}
