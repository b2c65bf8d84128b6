"""Adapters from a diffusers ``UNet2DConditionModel`` to lcmkit's denoiser contract, and the consistency function.

The contract (:mod:`lcmkit.solvers`): ``denoiser(x_t, t) -> (x0_hat, eps_hat)``, x_t (B, C, H, W), t (B,) long.

:func:`unet_denoiser` covers every model the LCM papers touch:

- **prediction type** (diffusers' ``scheduler.config.prediction_type``): ``"epsilon"`` (SD 1.x, SD2-base, SDXL),
  ``"v_prediction"`` (SD 2.x 768), ``"sample"``; converted to (x̂0, ε̂) by :func:`lcmkit.math.param.to_x0_eps`.
- **extra conditioning**: SD 1.x/2.x need only the text hidden states; SDXL also ``added_cond_kwargs``
  (pooled ``text_embeds`` and 6 ``time_ids``). Both live in one :class:`TextConditioning`.
- **classifier-free guidance** (the teacher of LCD, base models, LCM-LoRA with guidance): give ``uncond`` and
  ``omega``; conditional and unconditional halves run as ONE batched forward, combined as
  (1 + ω)·out_c − ω·out_∅ (LCM paper eq. 8, ω = diffusers' ``guidance_scale − 1``).
- **guidance (w) embedding** (the full LCM student, ``unet.config.time_cond_proj_dim``): give ``w_omega``; the
  UNet receives ``timestep_cond = guidance_embedding(ω)`` (LCM paper §4.2) and no second forward is made.

Guidance convention in this module: always the paper's ω (0 = conditional only). Conversion from diffusers'
``guidance_scale`` happens once, in :mod:`lcmkit.pipelines`.

Everything here is pure: a denoiser is a closure over its inputs, holds no state but constants memoised on first
use (the ω embedding, the α/σ table) and never touches autograd mode (wrap calls in ``torch.no_grad()`` for a
teacher; leave grads on for a student).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .math.consistency import SIGMA_DATA, TIMESTEP_SCALING, consistency_function
from .math.guidance import cfg, guidance_embedding
from .math.param import to_x0_eps
from .math.schedule import alpha_sigma, append_dims
from .solvers import Denoiser


@dataclass(frozen=True)
class TextConditioning:
    """What a UNet sees besides (x_t, t), batched along dim 0.

    ``encoder_hidden_states`` (B, L, D): text encoder states (SDXL: both encoders concatenated on D).
    ``text_embeds`` (B, P) and ``time_ids`` (B, 6): SDXL only (pooled embeds; original size, crop, target size,
    each as (height, width)). ``None`` for SD 1.x/2.x.
    """

    encoder_hidden_states: Tensor
    text_embeds: Tensor | None = None
    time_ids: Tensor | None = None

    def __len__(self) -> int:
        return self.encoder_hidden_states.shape[0]

    def added_cond_kwargs(self) -> dict[str, Tensor] | None:
        if self.text_embeds is None:
            return None
        return {"text_embeds": self.text_embeds, "time_ids": self.time_ids}

    def to(self, device=None, dtype=None) -> "TextConditioning":
        move = lambda x: None if x is None else x.to(device=device, dtype=dtype)  # noqa: E731
        return TextConditioning(move(self.encoder_hidden_states), move(self.text_embeds), move(self.time_ids))

    def cat(self, other: "TextConditioning") -> "TextConditioning":
        """[self; other] along the batch: the layout of a batched CFG forward."""
        join = lambda a, b: None if a is None else torch.cat([a, b])  # noqa: E731
        return TextConditioning(join(self.encoder_hidden_states, other.encoder_hidden_states),
                                join(self.text_embeds, other.text_embeds), join(self.time_ids, other.time_ids))


def architecture(unet) -> str:
    """``"sdxl"`` for a UNet with SDXL's text-time added conditioning (pooled text embeds + size/crop time ids),
    else ``"sd"`` (SD 1.x / 2.x): the one place lcmkit tells the two apart."""
    return "sdxl" if getattr(unet.config, "addition_embed_type", None) == "text_time" else "sd"


def has_w_embedding(unet) -> bool:
    """True for a full LCM UNet, whose time embedding takes the guidance embedding (``time_cond_proj_dim``)."""
    return getattr(unet.config, "time_cond_proj_dim", None) is not None


def unet_output(unet, x_t: Tensor, t: Tensor, cond: TextConditioning, timestep_cond: Tensor | None = None,
                dtype: torch.dtype | None = None) -> Tensor:
    """One raw UNet forward (its ``prediction_type`` output), run in ``dtype`` (default the UNet's), returned as
    x_t's dtype. Pass ``dtype`` in loops: diffusers' ``unet.dtype`` walks every module (~ms per call)."""
    dtype = unet.dtype if dtype is None else dtype
    out = unet(
        x_t.to(dtype), t,
        encoder_hidden_states=cond.encoder_hidden_states.to(dtype),
        timestep_cond=None if timestep_cond is None else timestep_cond.to(dtype),
        added_cond_kwargs=None if cond.added_cond_kwargs() is None else cond.to(dtype=dtype).added_cond_kwargs(),
        return_dict=False,
    )[0]
    return out.to(x_t.dtype)


def _per_sample(value: Tensor | float, batch: int, device) -> Tensor:
    """A float or (B,) tensor as a (B,) float64 tensor."""
    value = torch.as_tensor(value, dtype=torch.float64, device=device)
    return value.expand(batch) if value.ndim == 0 else value


def unet_denoiser(unet, alphas_cumprod: Tensor, cond: TextConditioning, *, prediction_type: str = "epsilon",
                  uncond: TextConditioning | None = None, omega: Tensor | float | None = None,
                  w_omega: Tensor | float | None = None) -> Denoiser:
    """Wrap ``unet`` as ``denoiser(x_t, t) -> (x0_hat, eps_hat)``.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (any dtype, any device; inputs are cast to it).
        alphas_cumprod: ᾱ table of the model's noise schedule (T,), e.g. ``alphas_cumprod_from_config``.
        cond: conditional text conditioning, batch B (the batch of x_t).
        prediction_type: what the UNet predicts: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        uncond: unconditional / negative conditioning, batch B; with ``omega`` turns on classifier-free guidance.
        omega: paper CFG scale ω (float or per-sample (B,)); ω = diffusers' guidance_scale − 1.
        w_omega: ω for the guidance embedding of a UNet with ``time_cond_proj_dim`` (float or (B,)); required by
            such a UNet, refused by any other.

    Returns a denoiser whose outputs are in x_t's dtype promoted to at least float32: CFG is combined on the raw
    model output (as diffusers' pipelines do; CFG is affine with weights summing to 1, so combining x̂0 or ε̂
    instead gives the same result), then converted to (x̂0, ε̂) with α_t, σ_t of ``alphas_cumprod``.
    """
    if (uncond is None) != (omega is None):
        raise ValueError("classifier-free guidance needs both uncond and omega (or neither)")
    if has_w_embedding(unet) and w_omega is None:
        raise ValueError("this UNet has a guidance embedding (time_cond_proj_dim); pass w_omega")
    if not has_w_embedding(unet) and w_omega is not None:
        raise ValueError("w_omega given, but this UNet has no guidance embedding (time_cond_proj_dim is None)")
    if uncond is not None and len(uncond) != len(cond):
        raise ValueError(f"uncond batch {len(uncond)} != cond batch {len(cond)}")
    # CFG forward layout: [uncond; cond], the order diffusers' pipelines use
    cfg_cond = None if uncond is None else uncond.cat(cond)
    unet_dtype = unet.dtype  # looked up once: the property walks every module
    # Per-call constants, computed on first use and reused by every step of a sampling loop (on a small UNet the
    # sampler's own tensor ops are a visible share of a step): the guidance embedding of the fixed ω per batch
    # size and device, and α_t, σ_t for every integer timestep per device (the same values alpha_sigma gives).
    # They are made outside inference mode, so a denoiser first called under torch.inference_mode can later be
    # trained through.
    w_embs: dict[tuple, Tensor] = {}
    tables: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def coefficients(t: Tensor, device) -> tuple[Tensor, Tensor]:
        if torch.is_floating_point(t):  # DPM-Solver's intermediate times: interpolated, not tabulated
            return alpha_sigma(alphas_cumprod.to(device), t)
        if device not in tables:
            with torch.inference_mode(False):
                ac = alphas_cumprod.to(device)
                tables[device] = alpha_sigma(ac, torch.arange(len(ac), device=device))
        alpha, sigma = tables[device]
        return alpha[t], sigma[t]

    def denoiser(x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        batch = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(batch) if t.ndim == 0 else t
        x_t = x_t.to(torch.promote_types(x_t.dtype, torch.float32))
        w_emb = None
        if w_omega is not None:  # (B, d), the LCM's guidance embedding of ω
            key = (batch, x_t.device)
            if key not in w_embs:
                with torch.inference_mode(False):
                    w_embs[key] = guidance_embedding(_per_sample(w_omega, batch, "cpu"),
                                                     unet.config.time_cond_proj_dim).to(x_t.device)
            w_emb = w_embs[key]
        if cfg_cond is None:
            out = unet_output(unet, x_t, t, cond, w_emb, unet_dtype)
        else:
            both = unet_output(unet, torch.cat([x_t, x_t]), torch.cat([t, t]), cfg_cond,
                               None if w_emb is None else torch.cat([w_emb, w_emb]), unet_dtype)
            out_uncond, out_cond = both.chunk(2)
            om = append_dims(_per_sample(omega, batch, x_t.device).to(x_t.dtype), x_t.ndim)
            out = cfg(out_cond, out_uncond, om)
        alpha_t, sigma_t = coefficients(t, x_t.device)
        alpha_t, sigma_t = (append_dims(v, x_t.ndim).to(x_t.dtype) for v in (alpha_t, sigma_t))
        return to_x0_eps(out, x_t, alpha_t, sigma_t, prediction_type)

    return denoiser


def consistency_fn(denoiser: Denoiser, sigma_data: float = SIGMA_DATA,
                   timestep_scaling: float = TIMESTEP_SCALING) -> Callable[[Tensor, Tensor], Tensor]:
    """f_θ(x_t, t) = c_skip(t)·x_t + c_out(t)·x̂0(x_t, t) (LCM paper eq. 2) over any denoiser.

    Shared by the distillation loss and anything that needs the boundary-conditioned output, so the two
    cannot drift apart. (``lcmkit.solvers.sample_lcm`` applies the same scalings to a plain denoiser.)
    """
    def f(x_t: Tensor, t: Tensor) -> Tensor:
        x0_hat, _ = denoiser(x_t, t)
        return consistency_function(x_t.to(x0_hat.dtype), x0_hat, t, sigma_data, timestep_scaling)

    return f
