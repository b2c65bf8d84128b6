"""LoRA for LCM: the LCM-LoRA target-module presets and saving trained adapters in diffusers' format.

Kept as separate, small functions so format conversion and task arithmetic (LCM-LoRA report, §3) can be added
beside them without touching what is here:

- :data:`LCM_LORA_TARGETS` / :func:`lcm_lora_config`: which UNet layers LCM-LoRA adapts (LCM-LoRA report;
  docs/reference.md, LCM-LoRA targets): attention projections, transformer in/out projections, feed-forward,
  every ResNet convolution and time-embedding projection, the down/up-sampling convolutions. Rank 64, alpha 64 by
  default, B zero-initialised (peft's default), so the adapted UNet equals the base UNet before training.
- :func:`save_lora_diffusers`: one ``pytorch_lora_weights.safetensors`` with keys ``unet.<module>.lora_A.weight``
  / ``.lora_B.weight`` and the adapter config (rank, alpha, targets) stored in the file's metadata, so
  ``pipe.load_lora_weights(folder)`` rebuilds scale = alpha / rank exactly (diffusers ≥ 0.34 reads it), written by
  diffusers' own writer. The recipes write their LoRAs through :func:`lcmkit.lora_export.write_lora_files` instead
  (that file plus the kohya-keyed one every other client applies whole).
- :data:`LORA_TARGET_PRESETS` / :func:`lora_config`: target sets for training other LoRAs (style LoRAs).
- :func:`load_into_adapters` / :func:`adapter_weights`: a LoRA file's layers (any format, via
  :mod:`lcmkit.lora_formats`) as trainable peft adapters on a UNet, and back, ranks and alphas kept per layer.
"""

from __future__ import annotations

from pathlib import Path

import torch

#: LCM-LoRA target modules per architecture (module-name suffixes, peft ``target_modules``). SD 1.x/2.x and SDXL
#: share one set: it gives 67.3M trainable parameters on SD1.5 and 196.8M on SDXL at rank 64 (report: 67.5M, 197M).
LCM_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "sd": ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
           "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"),
}
LCM_LORA_TARGETS["sdxl"] = LCM_LORA_TARGETS["sd"]

#: LCM-LoRA target modules for the rectified-flow transformers (peft suffixes, rank 64 by default).
#: SD3/SD3.5 (``SD3Transformer2DModel``): every joint block's attention projections (``attn`` and SD3.5-medium's
#: second image-only ``attn2``), their context twins (``add_*_proj``, ``to_add_out``; absent in the last block,
#: which is context-pre-only) and both feed-forwards (image ``ff``, context ``ff_context``). FLUX.1
#: (``FluxTransformer2DModel``): the same set on its double-stream blocks, and on its single-stream blocks the
#: attention ``to_q/to_k/to_v`` (they have no ``to_out``), ``proj_mlp`` and ``proj_out``.
FLOW_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "sd3": ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
            "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"),
}
FLOW_LORA_TARGETS["flux"] = FLOW_LORA_TARGETS["sd3"] + ("proj_mlp", "proj_out")
#: peft ``exclude_modules`` regexes (full match on the module path): FLUX's top-level ``proj_out`` (the final
#: patch projection) shares its name with the single-stream blocks' ``proj_out`` and is not adapted.
FLOW_LORA_EXCLUDE: dict[str, str | None] = {"sd3": None, "flux": "proj_out"}
#: model class name → flow preset
FLOW_MODEL_CLASSES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def lcm_lora_config(arch: str = "sd", rank: int = 64, alpha: float = 64.0):
    """peft ``LoraConfig`` for LCM-LoRA on ``arch`` (``"sd"`` or ``"sdxl"``); B starts at zero."""
    from peft import LoraConfig

    if arch not in LCM_LORA_TARGETS:
        raise ValueError(f"no LCM-LoRA preset for {arch!r}; known: {', '.join(LCM_LORA_TARGETS)}")
    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True, target_modules=list(LCM_LORA_TARGETS[arch]))


def flow_lora_preset(model) -> str:
    """The flow preset (``"sd3"`` / ``"flux"``) for a transformer, by its class (a model, a class or a class name)."""
    name = model if isinstance(model, str) else (model.__name__ if isinstance(model, type) else type(model).__name__)
    if name in FLOW_LORA_TARGETS:
        return name
    if name not in FLOW_MODEL_CLASSES:
        raise ValueError(f"no flow LCM-LoRA preset for {name}; known: {', '.join(FLOW_MODEL_CLASSES)}")
    return FLOW_MODEL_CLASSES[name]


def flow_lora_config(model, rank: int = 64, alpha: float = 64.0):
    """peft ``LoraConfig`` for LCM-LoRA on a flow transformer (``model``: as :func:`flow_lora_preset` takes);
    B starts at zero, so the adapted transformer equals the base one."""
    from peft import LoraConfig

    preset = flow_lora_preset(model)
    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True, target_modules=list(FLOW_LORA_TARGETS[preset]),
                      exclude_modules=FLOW_LORA_EXCLUDE[preset])


def init_lora_A_(unet, generator: torch.Generator) -> None:
    """Re-draw every lora_A from ``generator`` (peft's Kaiming-uniform, a = √5) instead of the global RNG,
    so a LoRA run depends only on its seed. B stays zero, so the adapted UNet still equals the base UNet."""
    with torch.no_grad():
        for name, p in sorted(unet.named_parameters()):
            if ".lora_A." in name:
                torch.nn.init.kaiming_uniform_(p, a=5**0.5, generator=generator)


def lora_layers(unet) -> list[str]:
    """Names of the modules that carry a LoRA adapter (peft tuner layers with at least one adapter)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [n for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer) and len(m.lora_A) > 0]


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The trainable LoRA tensors of ``unet`` (peft naming: ``<module>.lora_A.weight``), detached, on CPU."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def save_lora_diffusers(unet, folder: str | Path, pipeline_class=None, weight_name: str = LORA_WEIGHT_NAME) -> Path:
    """Write ``unet``'s LoRA as ``folder/pytorch_lora_weights.safetensors`` in diffusers' format.

    Keys are ``unet.<module>.lora_A.weight`` / ``lora_B.weight``; rank, alpha and target modules go into the
    safetensors metadata (``lora_adapter_metadata``), which ``load_lora_weights`` turns back into the same
    ``LoraConfig`` (scale = alpha / rank preserved, whatever the two are). ``pipeline_class`` picks the
    writer (``StableDiffusionXLPipeline`` for SDXL); tensors are saved in float32.
    """
    from diffusers import StableDiffusionPipeline

    pipeline_class = pipeline_class or StableDiffusionPipeline
    config = unet.peft_config["default"]
    metadata = config.to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"]) if metadata.get("target_modules") else None
    metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in metadata.items()}
    state = {k: v.float() for k, v in lora_state_dict(unet).items()}
    folder = Path(folder)
    pipeline_class.save_lora_weights(str(folder), unet_lora_layers=state, weight_name=weight_name,
                                     safe_serialization=True, unet_lora_adapter_metadata=metadata)
    return folder / weight_name


#: Target sets for training LoRAs, by name: ``lcm-lora`` (attention + feed-forward + every conv: the LCM-LoRA set)
#: and ``attention`` (q/k/v/out projections only, diffusers' text-to-image LoRA example).
LORA_TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "lcm-lora": LCM_LORA_TARGETS["sd"],
    "attention": ("to_q", "to_k", "to_v", "to_out.0"),
}


def lora_config(target_modules, rank: int, alpha: float):
    """peft ``LoraConfig`` over ``target_modules`` (module-name suffixes), B zero-initialised."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True, target_modules=list(target_modules))


def load_into_adapters(unet, weights) -> None:
    """Add the UNet layers of ``weights`` (:data:`lcmkit.lora_formats.LoraWeights`) to ``unet`` as a trainable
    peft adapter holding exactly those tensors: one adapter layer per LoRA layer (full module paths), each with its
    own rank and alpha, so the adapted UNet computes W + (alpha/r)·up@down as the file says. The adapter weights
    are float32 and trainable whatever the base weights' dtype (mixed-precision training keeps them so)."""
    from peft import LoraConfig

    from .errors import LcmkitError
    from .lora_formats import _config, split_name

    other = sorted({split_name(n)[0] for n in weights} - {"unet"})
    if other:
        raise LcmkitError(f"the LoRA has {', '.join(other)} layers; only UNet LoRA layers can be trained here")
    paths = {name: split_name(name)[1] for name in weights}
    # r / lora_alpha: the most common; rank_pattern / alpha_pattern: every layer that differs (full, escaped paths)
    unet.add_adapter(LoraConfig(**_config(weights, paths), init_lora_weights=True))
    applied = set(lora_layers(unet))
    if applied != set(paths.values()):
        raise LcmkitError(f"peft adapted {len(applied)} layers for a LoRA of {len(paths)}; please report this")
    with torch.no_grad():
        for name, layer in weights.items():
            module = unet.get_submodule(paths[name])
            for factor, value in ((module.lora_A["default"].weight, layer.down),
                                  (module.lora_B["default"].weight, layer.up)):
                if factor.shape != value.shape:
                    raise LcmkitError(f"LoRA layer {name}: {tuple(value.shape)} does not fit peft's "
                                      f"{tuple(factor.shape)}")
                factor.data = value.to(factor.device, torch.float32).clone()
                factor.requires_grad_(True)


def adapter_weights(unet, adapter: str = "default", component: str = "unet") -> dict:
    """``unet``'s peft adapter as :data:`lcmkit.lora_formats.LoraWeights` (``"unet.<path>" → LoraLayer``), float32
    on CPU, alpha per layer (peft's ``lora_alpha``), ready for :func:`lcmkit.lora_formats.save_lora`.
    ``component="transformer"`` names a flow transformer's layers ``transformer.<path>`` (SD3/FLUX files)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from .lora_formats import LoraLayer, float32_value

    weights = {}
    for name, module in unet.named_modules():
        if isinstance(module, BaseTunerLayer) and adapter in getattr(module, "lora_A", {}):
            down = module.lora_A[adapter].weight.detach().to("cpu", torch.float32).contiguous()
            up = module.lora_B[adapter].weight.detach().to("cpu", torch.float32).contiguous()
            weights[f"{component}.{name}"] = LoraLayer(down, up, float32_value(module.lora_alpha[adapter]))
    return weights
