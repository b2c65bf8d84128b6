"""A diffusers pipeline written as one single-file checkpoint in the original layout (``lcmkit convert``).

The file is what ComfyUI, Forge, AUTOMATIC1111 and diffusers' ``from_single_file`` load: CompVis LDM names for SD
1.x/2.x, Stability's SGM names for SDXL, safetensors, with ModelSpec metadata (``modelspec.architecture``,
``modelspec.prediction_type``). The names (docs/single-file.md):

- UNet: ``model.diffusion_model.<original name>`` from :func:`lcmkit.lora_sgm.original_names`;
- VAE: ``first_stage_model.<LDM name>`` (:func:`vae_original_names`); its mid-block attention q/k/v/proj_out are 1×1
  convolutions there, (C, C, 1, 1), where diffusers has linear layers (C, C);
- CLIP ViT-L (SD 1.x; SDXL's first encoder): ``cond_stage_model.transformer.text_model.…`` /
  ``conditioner.embedders.0.transformer.text_model.…``, the transformers names;
- OpenCLIP (SD 2.x; SDXL's second encoder): ``cond_stage_model.model.…`` / ``conditioner.embedders.1.model.…`` in
  open_clip's own layout (``transformer.resblocks.i.attn.in_proj_weight`` = q, k, v stacked; ``ln_1``,
  ``mlp.c_fc``, ``positional_embedding``, ``text_projection`` transposed) (:func:`openclip_state`).

lcmkit's own writers: diffusers has converters from the original layout only, not back to it. Each map is tested
to invert diffusers' converter exactly (tests/core/test_single_file.py): the file read back through
``convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint`` / ``convert_ldm_clip_checkpoint`` /
``convert_open_clip_checkpoint`` gives the same tensors under the same names.

A full LCM's guidance embedding (``time_embedding.cond_proj``) has no name in the original layout and no client
reads one. :func:`pipeline_state` therefore folds it for one guidance scale g (ω = g − 1) into the time embedding's
first bias, exactly: the UNet computes ``linear_1(t_emb + cond_proj(e(ω)))`` = ``W·t_emb + (b + W·cond_proj(e(ω)))``.
Kept instead (``keep_w_embedding``), it is written as ``model.diffusion_model.time_embed.cond_proj.weight``, which
only lcmkit reads back.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from .errors import LcmkitError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = {"sd1": "cond_stage_model.transformer.", "sdxl": "conditioner.embedders.0.transformer."}
OPENCLIP_PREFIX = {"sd2": "cond_stage_model.model.", "sdxl": "conditioner.embedders.1.model."}
#: lcmkit's name for a kept guidance embedding (no client has one)
W_EMBEDDING_KEY = UNET_PREFIX + "time_embed.cond_proj.weight"
#: ModelSpec ``modelspec.architecture`` values (Stability's ModelSpec, as sd-scripts writes them)
MODELSPEC_ARCHITECTURE = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512",
                          "sd2-v": "stable-diffusion-v2-768-v", "sdxl": "stable-diffusion-xl-v1-base"}


def family(pipe) -> str:
    """``sd1``, ``sd2`` or ``sdxl`` of a loaded pipeline: SDXL's added text-time conditioning, else the text
    encoder's width (768: CLIP ViT-L, SD 1.x; 1024: OpenCLIP ViT-H, SD 2.x)."""
    from .denoisers import architecture

    if architecture(pipe.unet) == "sdxl":
        return "sdxl"
    return "sd2" if pipe.text_encoder.config.hidden_size == 1024 else "sd1"


# ---------------------------------------------------------------------------------------------------------------
# UNet
# ---------------------------------------------------------------------------------------------------------------

def unet_state(unet, guidance: float | None = None, keep_w_embedding: bool = False) -> dict[str, Tensor]:
    """The UNet's weights under their original names (``model.diffusion_model.…``), the guidance embedding of a
    full LCM folded for ``guidance`` or kept (module docstring)."""
    from .lora_sgm import original_names

    names = original_names(unet)
    state = {k: v.detach() for k, v in unet.state_dict().items()}
    cond_proj = state.pop("time_embedding.cond_proj.weight", None)
    if cond_proj is None and (guidance is not None or keep_w_embedding):
        raise LcmkitError("--guidance and --keep-w-embedding apply to a full LCM (a UNet with a guidance embedding); "
                          "this model has none: drop them")
    out = {}
    for key, tensor in state.items():
        module, _, param = key.rpartition(".")
        if module not in names:
            raise LcmkitError(f"the UNet's {key} has no name in the original checkpoint layout; lcmkit writes SD 1.x/"
                              "2.x and SDXL UNets only")
        out[f"{UNET_PREFIX}{names[module]}.{param}"] = tensor
    if cond_proj is not None:
        if keep_w_embedding:
            out[W_EMBEDDING_KEY] = cond_proj
        elif guidance is None:
            raise LcmkitError("this model is a full LCM: its guidance embedding has no place in a single-file "
                              "checkpoint; pass --guidance G to fold guidance scale G into the file (the clients then "
                              "run it at that G), or --keep-w-embedding for a file only lcmkit reads")
        else:
            from .math.guidance import guidance_embedding

            bias_key = UNET_PREFIX + "time_embed.0.bias"
            w1 = state["time_embedding.linear_1.weight"].double()
            emb = guidance_embedding(torch.tensor([guidance - 1.0]), cond_proj.shape[1])  # as the UNet sees it
            shift = cond_proj.double() @ emb[0].double()
            out[bias_key] = (out[bias_key].double() + w1 @ shift).to(out[bias_key].dtype)
    return out


# ---------------------------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------------------------

_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_TOP = {"conv_norm_out": "norm_out"}


def _vae_name(key: str, num_up: int) -> str:
    """One diffusers VAE key → its LDM name (``encoder.down_blocks.1.resnets.0.conv1.weight`` →
    ``encoder.down.1.block.0.conv1.weight``)."""
    part, rest = key.split(".", 1)  # encoder / decoder / quant_conv / post_quant_conv
    if part not in ("encoder", "decoder"):
        return key
    bits = rest.split(".")
    if bits[0] in _VAE_TOP:
        return ".".join([part, _VAE_TOP[bits[0]], *bits[1:]])
    if bits[0] in ("down_blocks", "up_blocks"):
        i = int(bits[1])
        block = f"down.{i}" if bits[0] == "down_blocks" else f"up.{num_up - 1 - i}"  # LDM numbers up blocks upward
        if bits[2] in ("downsamplers", "upsamplers"):  # downsamplers.0.conv → downsample.conv
            return ".".join([part, block, "downsample" if bits[2] == "downsamplers" else "upsample", *bits[4:]])
        member = _VAE_RESNET.get(bits[4], bits[4])
        return ".".join([part, block, "block", bits[3], member, *bits[5:]])
    if bits[0] == "mid_block":
        if bits[1] == "resnets":
            return ".".join([part, "mid", f"block_{int(bits[2]) + 1}", *bits[3:]])
        inner = ".".join(bits[3:-1])
        return ".".join([part, "mid", "attn_1", _VAE_ATTENTION.get(inner, inner), bits[-1]])
    return ".".join([part, *bits])


def vae_state(vae) -> dict[str, Tensor]:
    """The VAE's weights under their LDM names (``first_stage_model.…``), attention projections as 1×1 convs."""
    num_up = len(vae.config.up_block_types)
    out = {}
    for key, tensor in vae.state_dict().items():
        name = _vae_name(key, num_up)
        if ".mid.attn_1." in name and name.rsplit(".", 2)[-2] in ("q", "k", "v", "proj_out") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # linear (C, C) → the original's 1×1 conv (C, C, 1, 1)
        out[VAE_PREFIX + name] = tensor.detach()
    return out


# ---------------------------------------------------------------------------------------------------------------
# Text encoders
# ---------------------------------------------------------------------------------------------------------------

def clip_state(encoder, prefix: str) -> dict[str, Tensor]:
    """A transformers CLIP text encoder under ``prefix`` + ``text_model.…`` (the original checkpoints hold the
    transformers model itself); position ids, a buffer, are not weights."""
    out = {}
    for key, tensor in encoder.state_dict().items():
        if key.endswith("position_ids"):
            continue
        name = key if key.startswith(("text_model.", "text_projection")) else "text_model." + key
        out[prefix + name] = tensor.detach()
    return out


_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}
_OPENCLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                 "embeddings.position_embedding.weight": "positional_embedding",
                 "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}


def openclip_state(encoder, prefix: str) -> dict[str, Tensor]:
    """A transformers CLIP text encoder in open_clip's layout under ``prefix``: per layer q, k, v stacked into
    ``attn.in_proj_weight`` / ``in_proj_bias``; ``text_projection`` (x @ P) is transformers' projection weight
    transposed."""
    state = {k.removeprefix("text_model."): v.detach() for k, v in encoder.state_dict().items()
             if not k.endswith("position_ids")}
    out = {}
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [state.pop(f"{src}self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")])
        for key in [k for k in state if k.startswith(src)]:
            inner, param = key[len(src):].rsplit(".", 1)
            if inner not in _OPENCLIP_LAYER:
                raise LcmkitError(f"text encoder weight {key} has no open_clip name")
            out[f"{dst}{_OPENCLIP_LAYER[inner]}.{param}"] = state.pop(key)
    for key, name in _OPENCLIP_TOP.items():
        out[prefix + name] = state.pop(key)
    if "text_projection.weight" in state:
        out[prefix + "text_projection"] = state.pop("text_projection.weight").T.contiguous()
    if state:
        raise LcmkitError(f"text encoder weights with no open_clip name: {', '.join(sorted(state)[:3])}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# The whole file
# ---------------------------------------------------------------------------------------------------------------

def pipeline_state(pipe, guidance: float | None = None, keep_w_embedding: bool = False) -> dict[str, Tensor]:
    """Every weight of ``pipe`` (UNet, VAE, text encoders) under its original-layout name."""
    kind = family(pipe)
    state = {**unet_state(pipe.unet, guidance, keep_w_embedding), **vae_state(pipe.vae)}
    if kind == "sdxl":
        state.update(clip_state(pipe.text_encoder, CLIP_PREFIX["sdxl"]))
        state.update(openclip_state(pipe.text_encoder_2, OPENCLIP_PREFIX["sdxl"]))
    elif kind == "sd2":
        state.update(openclip_state(pipe.text_encoder, OPENCLIP_PREFIX["sd2"]))
    else:
        state.update(clip_state(pipe.text_encoder, CLIP_PREFIX["sd1"]))
    return state


def modelspec(pipe, guidance: float | None, title: str) -> dict[str, str]:
    """ModelSpec metadata: architecture, prediction type, resolution, title; where a guidance scale was folded in,
    ``lcmkit.guidance_scale``."""
    kind = family(pipe)
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    arch = "sd2-v" if kind == "sd2" and prediction == "v_prediction" else kind
    size = pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    meta = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": MODELSPEC_ARCHITECTURE[arch],
            "modelspec.title": title, "modelspec.resolution": f"{size}x{size}",
            "modelspec.prediction_type": "v" if prediction == "v_prediction" else "epsilon"}
    if getattr(pipe.unet.config, "time_cond_proj_dim", None) is not None:
        meta["lcmkit.model"] = "full LCM (one step: guidance through the w-embedding, no CFG)"
        if guidance is not None:
            meta["lcmkit.guidance_scale"] = repr(float(guidance))
    return meta


SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def write_single_file(pipe, out: str | os.PathLike, *, guidance: float | None = None, keep_w_embedding: bool = False,
                      save_dtype: str | None = None) -> Path:
    """Write ``pipe`` as ``out`` (a ``.safetensors`` single-file checkpoint in the original layout), atomically and
    readable by other users (the umask's mode, :mod:`lcmkit.atomic`); ``save_dtype`` (fp32 / fp16 / bf16) casts
    floating-point weights, default: as they are."""
    from safetensors.torch import save_file

    from .atomic import atomic_write

    out = Path(out)
    if out.suffix.lower() != ".safetensors":
        raise LcmkitError(f"--out {out} must be a .safetensors file (lcmkit writes safetensors only)")
    if save_dtype is not None and save_dtype not in SAVE_DTYPES:
        raise LcmkitError(f"save dtype must be one of {', '.join(SAVE_DTYPES)}, got {save_dtype!r}")
    state = pipeline_state(pipe, guidance, keep_w_embedding)
    cast = SAVE_DTYPES.get(save_dtype)
    state = {k: (v.to(cast) if cast is not None and v.is_floating_point() else v).contiguous() for k, v in state.items()}
    meta = modelspec(pipe, guidance, out.stem)
    atomic_write(out, lambda tmp: save_file(state, str(tmp), metadata=meta))
    return out
