"""The roles of consistency training (LCM paper Algorithm 1): teacher, student θ and target θ⁻, whatever the
denoiser (a UNet, :class:`lcmkit.train.distill.Models`; a flow transformer,
:class:`lcmkit.train.flow_distill.FlowModels`), and how they are built and called: the frozen parts, LoRA mode's
one-model roles (teacher = adapters off, target = online or an EMA of the adapter), the denoiser wrappers.
Shared by distillation and fine-tuning.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..errors import LcmkitError
from .optim import ema_update_
from .runtime import autocast, weight_dtype


@dataclass
class Roles:
    """The three roles of Algorithm 1, whatever the denoiser (a UNet: :class:`lcmkit.train.distill.Models`; a flow transformer:
    :class:`lcmkit.train.flow_distill.FlowModels`). In LoRA mode ``teacher``, ``student`` and ``target`` are the same
    model (the target maybe through an :class:`EmaLoraTarget`)."""

    pipe: object               # the teacher pipeline (VAE, text encoders, tokenizers, scheduler)
    mode: str
    arch: str                  # "sd", "sdxl", "sd3" or "flux"
    teacher: torch.nn.Module
    student: torch.nn.Module
    target: "torch.nn.Module | EmaLoraTarget"
    device: torch.device
    mixed_precision: str

    #: the pipeline component the student is, as LoRA files name it
    component = "unet"

    @property
    def omega_preset(self) -> str:
        """The key of the default ω range (``lcmkit.train.distill.DEFAULT_OMEGA``): the architecture."""
        return self.arch

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.trainable_named()]

    def trainable_named(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.student.named_parameters() if p.requires_grad]

    def checkpoint_weights(self) -> dict[str, dict[str, Tensor]]:
        """What a checkpoint keeps: θ and θ⁻ (full), or the LoRA layers (LoRA: θ⁻ is θ)."""
        if self.mode == "full":
            return {"student": self.student.state_dict(), "target": self.target.state_dict()}
        if isinstance(self.target, EmaLoraTarget):
            return {"lora": dict(self.trainable_named()), "lora_target": self.target.shadow}
        return {"lora": dict(self.trainable_named())}

    @torch.no_grad()
    def load_weights(self, weights: dict[str, dict[str, Tensor]], path) -> None:
        """Put back what :meth:`checkpoint_weights` saved (``path``: the checkpoint, for the message)."""
        if self.mode == "full":
            self.student.load_state_dict(weights["student"])
            self.target.load_state_dict(weights["target"])
            return
        named = dict(self.trainable_named())
        if set(named) != set(weights["lora"]):
            raise LcmkitError(f"checkpoint {path} holds different LoRA layers than this model")
        for n, p in named.items():
            p.copy_(weights["lora"][n])
        if isinstance(self.target, EmaLoraTarget):
            if set(weights.get("lora_target", {})) != set(named):
                raise LcmkitError(f"checkpoint {path} has no EMA target of these LoRA layers (trained without "
                                  "--lora-ema?)")
            for n, v in self.target.shadow.items():
                v.copy_(weights["lora_target"][n])
        elif "lora_target" in weights:
            raise LcmkitError(f"checkpoint {path} was trained with an EMA LoRA target (--lora-ema); resume with the "
                              "same --lora-ema")


class EmaLoraTarget:
    """θ⁻ of LoRA mode with an EMA: the one shared UNet, called with ``shadow`` (an EMA of the trainable adapter
    weights, by name) in place of the trained ones through ``torch.func.functional_call``. Nothing in the UNet is
    overwritten, so the student's autograd graph (which holds the adapter weights) is untouched, and the teacher
    (adapters off) and student share the same module."""

    def __init__(self, unet: torch.nn.Module, shadow: dict[str, Tensor]):
        self.unet, self.shadow = unet, shadow

    @property
    def config(self):
        return self.unet.config

    @property
    def dtype(self):
        return self.unet.dtype

    @property
    def attn_processors(self):
        return self.unet.attn_processors

    def set_attn_processor(self, processor) -> None:
        """Attention processors are the shared module's (denoisers may swap them for a call)."""
        self.unet.set_attn_processor(processor)

    def __call__(self, *args, **kwargs):
        return torch.func.functional_call(self.unet, self.shadow, args, kwargs, strict=False)

    @torch.no_grad()
    def update_(self, online: dict[str, Tensor], mu: float) -> None:
        """θ⁻ ← μ·θ⁻ + (1 − μ)·θ over the adapter weights."""
        ema_update_([self.shadow[n] for n in online], online.values(), mu)

    @contextlib.contextmanager
    def applied(self, online: dict[str, Tensor]):
        """The shadow weights copied into the UNet for the duration (saving the result), then the online ones back."""
        backup = {n: p.detach().clone() for n, p in online.items()}
        with torch.no_grad():
            for n, p in online.items():
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in online.items():
                    p.copy_(backup[n])


def freeze_frozen_parts(pipe, device: torch.device, mixed_precision: str) -> None:
    """VAE and text encoders: no gradients, eval mode, on ``device`` in the weight dtype (the VAE stays float32
    under fp16 when its config asks for upcasting)."""
    dtype = weight_dtype(mixed_precision)
    encoders = [n for n in ("text_encoder", "text_encoder_2", "text_encoder_3") if getattr(pipe, n, None) is not None]
    for name in ("vae", *encoders):
        getattr(pipe, name).requires_grad_(False).eval()
    upcast = dtype == torch.float16 and pipe.vae.config.get("force_upcast", False)
    pipe.vae.to(device, torch.float32 if upcast else dtype)
    for name in encoders:
        getattr(pipe, name).to(device, dtype)


def lora_roles(model: torch.nn.Module, lora_config, cfg, device: torch.device, generator: torch.Generator):
    """LoRA mode's (teacher, student, target): the frozen ``model`` in the weight dtype with a trainable float32
    adapter (``lora_config``, lora_A drawn from ``generator``, B = 0), all three the same module; the target an
    :class:`EmaLoraTarget` of it when ``cfg.lora_ema`` > 0."""
    from ..lora import init_lora_A_

    dtype = weight_dtype(cfg.mixed_precision)
    model.requires_grad_(False).eval().to(device)
    if model.dtype != dtype:  # (cast only when needed: diffusers warns on every cast of an SD3 transformer)
        model.to(dtype)
    model.add_adapter(lora_config)
    init_lora_A_(model, generator)
    for p in model.parameters():
        if p.requires_grad:  # the LoRA weights train in float32 whatever the base dtype
            p.data = p.data.float()
    teacher = student = target = model.train()
    if cfg.lora_ema > 0:
        target = EmaLoraTarget(model, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    return teacher, student, target


def adapters_off(denoiser: Callable, model) -> Callable:
    """The LoRA teacher: the same model (UNet or transformer) with its adapters disabled for the duration of the
    call."""
    def teacher(x_t, t):
        model.disable_adapters()
        try:
            return denoiser(x_t, t)
        finally:
            model.enable_adapters()
    return teacher


def under_autocast(denoiser: Callable, models: Roles) -> Callable:
    """``denoiser`` run under the mixed-precision autocast of the run (the student's and target's forwards)."""
    def wrapped(x_t, t):
        with autocast(models.device, models.mixed_precision):
            return denoiser(x_t, t)
    return wrapped
