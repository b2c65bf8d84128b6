"""Latent consistency distillation of a flow-matching teacher (SD3 / SD3.5): the flow family of ``lcmkit distill``.

:func:`lcmkit.train.distill.distill` runs the recipe; this module supplies what differs from a UNet teacher
(:class:`~lcmkit.train.distill.DistillFamily`). Per micro-batch (docs/flow-matching.md, "The flow LCD loss"):

1. z = (E(x).mean − shift_factor)·scaling_factor and the SD3 text conditioning (CLIP-L ‖ CLIP-G tokens, T5's or
   zeros; the unconditional is "" encoded, as the SD3 pipeline's negative prompt);
2. ω ~ U[ω_min, ω_max], n ~ U{0 … N−1}, ε ~ N(0, I), drawn as for a UNet teacher;
3. :func:`lcmkit.losses.flow_lcd_loss`: x_{σ_{n+k}} = (1 − σ)·z + σ·ε on the skipping-step grid of the scheduler's
   shifted table; the guided teacher (CFG on v, one batched forward) takes one Euler or Heun step to σ_n; loss
   d(f_θ(x_{σ_{n+k}}, σ_{n+k}), f_θ⁻(x̂_{σ_n}, σ_n)) with f(x, σ) = x − σ·v (the boundary f(x, 0) = x exact).

LoRA mode only (guidance baked in; an SD3 transformer has no guidance embedding for a full LCM's ω): LoRA on
:data:`lcmkit.lora.FLOW_LORA_TARGETS` (rank 64 by default); teacher = the same transformer with its adapters off;
target = the online model without gradients, or an EMA of the adapter (``lora_ema``). The result is diffusers'
``pytorch_lora_weights.safetensors`` (``transformer.*`` keys, alphas in the header), which
``StableDiffusion3Pipeline.load_lora_weights(folder)`` loads whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import LcmkitError
from ..flow_denoisers import SD3Conditioning, scheduler_sigmas, scheduler_training_grid, sd3_conditioning, sd3_denoiser
from ..losses import flow_lcd_loss
from .distill import DistillFamily
from .encode import Encoder
from .roles import Roles, adapters_off, freeze_frozen_parts, lora_roles, under_autocast
from .runtime import autocast


@dataclass
class FlowModels(Roles):
    """The roles on a flow teacher: its distillation grid σ_0 = 0 < … < σ_N (float64, on the device)."""

    grid: Tensor
    num_train_timesteps: int

    component = "transformer"


def build_flow_models(cfg, pipe, device: torch.device, generator: torch.Generator, resolution: int) -> FlowModels:
    """Freeze and cast the pipeline's parts, put the LoRA on the transformer (:func:`lcmkit.train.roles.lora_roles`)
    and build the grid for latents of ``resolution`` pixels (the shift may depend on their size)."""
    from ..lora import flow_lora_config
    from ..pipelines import vae_scale_factor

    transformer = pipe.transformer
    latent, patch = resolution // vae_scale_factor(pipe), transformer.config.patch_size
    if latent % patch:
        raise LcmkitError(f"resolution {resolution} gives {latent}-latent images, not a multiple of the "
                          f"transformer's patch size {patch}; use a multiple of {vae_scale_factor(pipe) * patch}")
    freeze_frozen_parts(pipe, device, cfg.mixed_precision)
    teacher, student, target = lora_roles(transformer, flow_lora_config(transformer, cfg.lora_rank, cfg.lora_alpha),
                                          cfg, device, generator)
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    config = pipe.scheduler.config
    grid = scheduler_training_grid(config, cfg.skip, (latent, latent), patch).to(device)
    return FlowModels(pipe=pipe, mode=cfg.mode, arch="sd3", teacher=teacher, student=student, target=target,
                      device=device, mixed_precision=cfg.mixed_precision, grid=grid,
                      num_train_timesteps=config.get("num_train_timesteps", 1000))


def flow_num_points(models: FlowModels, cfg) -> int:
    """N: the grid's pairs (σ_{n+1}, σ_n), n = 0 … N − 1."""
    return len(models.grid) - 1


def make_flow_denoisers(models: FlowModels, cond: SD3Conditioning, uncond: SD3Conditioning, omega: Tensor):
    """(student, target, teacher) flow denoisers with this batch's conditioning and per-sample ω bound in: the
    teacher guided by CFG on v with its adapters off; student and target conditional only (guidance baked in)."""
    T = models.num_train_timesteps
    teacher = adapters_off(sd3_denoiser(models.teacher, cond, uncond=uncond, omega=omega, num_train_timesteps=T),
                           models.teacher)
    student = under_autocast(sd3_denoiser(models.student, cond, num_train_timesteps=T), models)
    target = under_autocast(sd3_denoiser(models.target, cond, num_train_timesteps=T), models)
    return student, target, teacher


def flow_step_loss(models: FlowModels, cfg, z0: Tensor, cond: SD3Conditioning, uncond: SD3Conditioning,
                   omega: Tensor, index: Tensor, noise: Tensor) -> Tensor:
    """The flow LCD loss (:func:`lcmkit.losses.flow_lcd_loss`) of one micro-batch for the draws (ω, n, ε)."""
    device = models.device
    student, target, teacher = make_flow_denoisers(models, cond, uncond, omega.to(device))
    loss, _ = flow_lcd_loss(student, target, teacher, z0, noise.to(device), index.to(device), models.grid,
                            solver=cfg.solver, loss_type=cfg.loss, huber_c=cfg.huber_c)
    return loss


@torch.no_grad()
def flow_validation_images(models: FlowModels, encoder: Encoder, prompts: list[str], steps: list[int],
                           omega: float, seed: int, resolution: int, num_points: int) -> list[list]:
    """Flow LCM sampling (``FlowMatchLCMScheduler``'s steps on the scheduler's table) with θ⁻: one row per step
    count, one column per prompt, prompt i always from seed + i (``omega`` and ``num_points``: unused, guidance is
    baked in and the sampler walks the scheduler's table)."""
    from ..flow_pipelines import sample_flow_latents
    from ..pipelines import decode_latents, to_pil, vae_scale_factor

    pipe = models.pipe
    cond, _ = sd3_conditioning(pipe, prompts)
    latent = resolution // vae_scale_factor(pipe)
    shape = (pipe.transformer.config.in_channels, latent, latent)
    rows = []
    for n in steps:
        generators = [torch.Generator(models.device).manual_seed(seed + i) for i in range(len(prompts))]
        sigmas = scheduler_sigmas(pipe.scheduler.config, n, shape[1:], pipe.transformer.config.patch_size)
        with autocast(models.device, models.mixed_precision):
            latents = sample_flow_latents(pipe, cond, None, None, "lcm", sigmas.to(models.device), generators, shape,
                                          transformer=models.target)
        rows.append(to_pil(decode_latents(pipe, latents)))
    return rows


FLOW = DistillFamily(build_flow_models, flow_num_points, flow_step_loss, flow_validation_images)
