"""Latent consistency distillation of a flow-matching teacher (SD3 / SD3.5, FLUX.1): the flow family of
``lcmkit distill``.

:func:`lcmkit.train.distill.distill` runs the recipe; this module supplies what differs from a UNet teacher
(:class:`~lcmkit.train.distill.DistillFamily`), and :class:`lcmkit.flow_pipelines.FlowArch` what differs between
SD3 and FLUX (text conditioning, the denoiser, the grid). Per micro-batch (docs/flow-matching.md, "The flow LCD
loss"):

1. z = (E(x).mean − shift_factor)·scaling_factor and the text conditioning (SD3: CLIP-L ‖ CLIP-G tokens, T5's or
   zeros; FLUX: T5's tokens and CLIP-L's pooled vector); the unconditional is "" encoded, as the pipelines'
   default negative prompt;
2. ω ~ U[ω_min, ω_max], n ~ U{0 … N−1}, ε ~ N(0, I), drawn as for a UNet teacher;
3. :func:`lcmkit.losses.flow_lcd_loss`: x_{σ_{n+k}} = (1 − σ)·z + σ·ε on the skipping-step grid of the
   pipeline's shifted table (FLUX: μ of the training resolution's token count); the guided teacher takes one
   Euler or Heun step to σ_n; loss d(f_θ(x_{σ_{n+k}}, σ_{n+k}), f_θ⁻(x̂_{σ_n}, σ_n)) with f(x, σ) = x − σ·v
   (the boundary f(x, 0) = x exact).

Guidance of the teacher: CFG on v, (1 + ω)·v_c − ω·v_∅ in one batched forward (SD3; FLUX without a guidance
embedding). A guidance-distilled FLUX transformer (FLUX.1-dev) instead takes g = ω + 1 through its guidance
embedding (one forward, no unconditional pass), and the student and target see the same g: the LoRA learns the
consistency function of each g's guided flow, and is sampled with the g it was trained on (``--guidance g`` with
g in [ω_min + 1, ω_max + 1]). Elsewhere guidance is baked in (student and target conditional only).

LoRA mode only: LoRA on :data:`lcmkit.lora.FLOW_LORA_TARGETS` (rank 64 by default); teacher = the same transformer
with its adapters off; target = the online model without gradients, or an EMA of the adapter (``lora_ema``). The
result is diffusers' ``pytorch_lora_weights.safetensors`` (``transformer.*`` keys, alphas in the header), which
``load_lora_weights(folder)`` loads whole, and ``pytorch_lora_weights_comfyui.safetensors`` (the same keys and a
``.alpha`` tensor per layer, which ComfyUI reads)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import LcmkitError
from ..flow_denoisers import FlowConditioning
from ..flow_pipelines import FlowArch, flow_arch, latent_shape
from ..losses import flow_lcd_loss
from .distill import DistillFamily
from .encode import Encoder
from .roles import Roles, adapters_off, freeze_frozen_parts, lora_roles, under_autocast
from .runtime import autocast


@dataclass
class FlowModels(Roles):
    """The roles on a flow teacher: its distillation grid σ_0 = 0 < … < σ_N (float64, on the device), its
    architecture, and whether ω goes in through the transformer's guidance embedding (FLUX.1-dev)."""

    grid: Tensor
    num_train_timesteps: int
    flow: FlowArch
    embedded: bool

    component = "transformer"

    @property
    def omega_preset(self) -> str:
        """The default ω range's key (``lcmkit.train.distill.DEFAULT_OMEGA``): FLUX guided by its embedding or by
        true CFG have different ones."""
        return self.arch if self.embedded or self.arch != "flux" else "flux-cfg"


def build_flow_models(cfg, pipe, device: torch.device, generator: torch.Generator, resolution: int) -> FlowModels:
    """Freeze and cast the pipeline's parts, put the LoRA on the transformer (:func:`lcmkit.train.roles.lora_roles`)
    and build the grid for latents of ``resolution`` pixels (the shift may depend on their size)."""
    from ..lora import flow_lora_config
    from ..pipelines import vae_scale_factor

    arch, transformer = flow_arch(pipe), pipe.transformer
    f, patch = vae_scale_factor(pipe), arch.latent_multiple(transformer.config)
    latent = resolution // f
    if latent % patch:
        raise LcmkitError(f"resolution {resolution} gives {latent}-latent images, not a multiple of the "
                          f"transformer's patch size {patch}; use a multiple of {f * patch}")
    freeze_frozen_parts(pipe, device, cfg.mixed_precision)
    teacher, student, target = lora_roles(transformer, flow_lora_config(transformer, cfg.lora_rank, cfg.lora_alpha),
                                          cfg, device, generator)
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    return FlowModels(pipe=pipe, mode=cfg.mode, arch=arch.name, teacher=teacher, student=student, target=target,
                      device=device, mixed_precision=cfg.mixed_precision,
                      grid=arch.grid(pipe, cfg.skip, (latent, latent)).to(device),
                      num_train_timesteps=pipe.scheduler.config.get("num_train_timesteps", 1000), flow=arch,
                      embedded=arch.embeds_guidance(transformer))


def flow_num_points(models: FlowModels, cfg) -> int:
    """N: the grid's pairs (σ_{n+1}, σ_n), n = 0 … N − 1."""
    return len(models.grid) - 1


def make_flow_denoisers(models: FlowModels, cond: FlowConditioning, uncond: FlowConditioning, omega: Tensor):
    """(student, target, teacher) flow denoisers with this batch's conditioning and per-sample ω bound in. Teacher
    (adapters off): CFG on v with ω, or on a guidance-distilled FLUX one forward with the embedded g = ω + 1
    (diffusers passes g itself). Student and target: conditional only (guidance baked in), or with the teacher's
    embedded g."""
    T, make = models.num_train_timesteps, models.flow.denoiser
    if models.embedded:
        guided = dict(guidance=omega + 1)
        teacher = make(models.teacher, cond, num_train_timesteps=T, **guided)
    else:
        guided = {}
        teacher = make(models.teacher, cond, uncond=uncond, omega=omega, num_train_timesteps=T)
    student = under_autocast(make(models.student, cond, num_train_timesteps=T, **guided), models)
    target = under_autocast(make(models.target, cond, num_train_timesteps=T, **guided), models)
    return student, target, adapters_off(teacher, models.teacher)


def flow_step_loss(models: FlowModels, cfg, z0: Tensor, cond: FlowConditioning, uncond: FlowConditioning,
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
    """Flow LCM sampling (``FlowMatchLCMScheduler``'s steps on the pipeline's table) with θ⁻: one row per step
    count, one column per prompt, prompt i always from seed + i. ``omega``: the embedded g = ω + 1 of a
    guidance-distilled FLUX student; unused elsewhere (guidance baked in). ``num_points``: unused (the sampler
    walks the pipeline's table)."""
    from ..flow_pipelines import sample_flow_latents
    from ..pipelines import decode_latents, to_pil

    pipe = models.pipe
    cond, _ = models.flow.conditioning(pipe, prompts)
    shape = latent_shape(pipe, resolution, resolution)
    rows = []
    for n in steps:
        generators = [torch.Generator(models.device).manual_seed(seed + i) for i in range(len(prompts))]
        sigmas = models.flow.sigmas(pipe, n, shape[1:])
        with autocast(models.device, models.mixed_precision):
            latents = sample_flow_latents(pipe, cond, None, None, "lcm", sigmas.to(models.device), generators, shape,
                                          guidance=omega + 1 if models.embedded else None, transformer=models.target)
        rows.append(to_pil(decode_latents(pipe, latents)))
    return rows


FLOW = DistillFamily(build_flow_models, flow_num_points, flow_step_loss, flow_validation_images)
