"""FLUX.1 (``FluxTransformer2DModel``) as a flow denoiser, and text-to-image on a ``FluxPipeline``.

The contract is :mod:`lcmkit.flow_solvers`' ``denoiser(x_sigma, sigma) -> (x0_hat, v_hat)`` with x_σ (B, C, H, W)
the VAE latent (C = 16) and σ (B,) float; the math is :mod:`lcmkit.math.flow` (v ≈ ε − x0, x̂0 = x_σ − σ·v, eq. F3).
What FLUX does differently from SD3 (docs/flow-matching.md, "FLUX.1"):

- **Packing.** The transformer sees 2×2 latent patches as tokens: (B, C, H, W) → (B, (H/2)·(W/2), 4C), patch
  (i, j) at token i·(W/2) + j, its 4C features ordered (c, dy, dx). Packing is a permutation, so x̂0 and v are
  computed in the (B, C, H, W) layout the VAE and the losses use.
- **Position ids.** Rotary position ids instead of a position table: image token (i, j) has id (0, i, j), every
  text token (0, 0, 0).
- **Timestep scale.** ``FluxPipeline`` passes t/1000 = σ (t = σ·1000 from the scheduler) and the transformer
  multiplies by 1000 again, so the sinusoidal embedding sees σ·1000 as SD3's does.
- **Guidance.** A guidance-distilled transformer (FLUX.1-dev, ``guidance_embeds=True``) takes the guidance scale g
  as a second embedded scalar (×1000 inside, like the timestep): one forward, no unconditional pass. Without the
  embedding (FLUX.1-schnell), guidance is true CFG on v with a negative prompt, (1 + ω)·v_c − ω·v_∅,
  ω = ``true_cfg_scale`` − 1, in one batched forward [uncond; cond].
- **Schedule.** σ_i = S3(linspace(1, 1/N, N); μ(L)), μ linear in the image sequence length L = (H/2)·(W/2)
  (eqs. S2, S3), so the shift grows with resolution.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .errors import LcmkitError
from .flow_denoisers import FlowConditioning, truncation_quiet
from .flow_solvers import FlowDenoiser, as_sigma_batch
from .math.flow import dynamic_shift_mu, flow_sigmas, timestep_from_sigma, x0_from_velocity
from .math.guidance import cfg
from .math.schedule import append_dims
from .solvers import Generators

#: diffusers' default embedded guidance for FLUX.1-dev (``FluxPipeline.__call__``)
DEFAULT_FLUX_GUIDANCE = 3.5
#: T5 tokens per prompt, ``FluxPipeline``'s default ``max_sequence_length``
DEFAULT_MAX_SEQUENCE_LENGTH = 512
#: the max_shift ``FluxPipeline``'s ``calculate_shift`` call falls back to when the scheduler config has none
FLUX_DEFAULT_MAX_SHIFT = 1.15


# ---------------------------------------------------------------------------------------------------------------
# Latent layout: 2×2 patches as tokens, and their rotary position ids
# ---------------------------------------------------------------------------------------------------------------

def pack_latents(x: Tensor) -> Tensor:
    """(B, C, H, W) → (B, (H/2)·(W/2), 4C): each 2×2 patch one token, features (c, dy, dx) (``_pack_latents``)."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX packs 2×2 latent patches: latent height and width must be even, got {h}×{w}")
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, H/2, W/2, C, 2, 2)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, latent_hw: tuple[int, int]) -> Tensor:
    """Inverse of :func:`pack_latents`: (B, (H/2)·(W/2), 4C) → (B, C, H, W) for latent size ``latent_hw``."""
    b, n, d = tokens.shape
    h, w = latent_hw
    if n != (h // 2) * (w // 2):
        raise ValueError(f"{n} tokens do not tile a {h}×{w} latent in 2×2 patches")
    x = tokens.reshape(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, H/2, 2, W/2, 2)
    return x.reshape(b, d // 4, h, w)


def latent_image_ids(latent_hw: tuple[int, int], device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """The rotary ids of the packed image tokens, ((H/2)·(W/2), 3): token (i, j) → (0, i, j), row-major as
    :func:`pack_latents` orders them (``_prepare_latent_image_ids``)."""
    h, w = latent_hw[0] // 2, latent_hw[1] // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


def image_seq_len(latent_hw: tuple[int, int]) -> int:
    """L = (H/2)·(W/2), the number of image tokens, which sets FLUX's shift μ (eq. S2)."""
    return (latent_hw[0] // 2) * (latent_hw[1] // 2)


# ---------------------------------------------------------------------------------------------------------------
# The denoiser
# ---------------------------------------------------------------------------------------------------------------

#: FLUX's conditioning is the flow one: T5's tokens ``encoder_hidden_states`` (B, L, D) and CLIP-L's pooled output
#: ``pooled_projections`` (B, P); the text ids are (L, 3) zeros
FluxConditioning = FlowConditioning


@torch.no_grad()
def flux_conditioning(pipe, prompts: list[str], negative_prompt: str | list[str] | None = None,
                      guided: bool = False, max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH
                      ) -> tuple[FlowConditioning, FlowConditioning | None]:
    """(cond, uncond) of ``prompts`` by ``FluxPipeline.encode_prompt`` (T5 tokens padded to
    ``max_sequence_length``, CLIP-L's pooled output); ``uncond``, the negative prompt ("" by default; a list: one
    per prompt), only when ``guided`` (true CFG). Cond and uncond have the same token length, as true CFG needs."""
    device = next(pipe.text_encoder_2.parameters()).device

    def encode(texts: list[str]) -> FlowConditioning:
        with truncation_quiet(pipe):
            emb, pooled, _ = pipe.encode_prompt(texts, None, device=device, max_sequence_length=max_sequence_length)
        return FlowConditioning(emb, pooled)

    if not guided:
        return encode(prompts), None
    negative = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt or ""] * len(prompts)
    return encode(prompts), encode(negative)


def flux_denoiser(transformer, cond: FluxConditioning, *, guidance: Tensor | float | None = None,
                  uncond: FluxConditioning | None = None, omega: Tensor | float | None = None,
                  num_train_timesteps: int = 1000) -> FlowDenoiser:
    """Wrap a ``FluxTransformer2DModel`` as ``denoiser(x_sigma, sigma) -> (x0_hat, v_hat)`` on (B, C, H, W) latents.

    ``guidance``: the embedded guidance scale g (float or (B,)), required by and only accepted for a transformer
    with ``guidance_embeds`` (diffusers passes g itself, not g − 1). ``uncond`` and ``omega`` together turn on true
    CFG on v. Outputs are in x_σ's dtype promoted to at least float32; the transformer runs in its own dtype.
    """
    embeds = bool(transformer.config.guidance_embeds)
    if embeds and guidance is None:
        raise ValueError("this FLUX transformer is guidance-distilled (guidance_embeds): pass guidance=g")
    if not embeds and guidance is not None:
        raise ValueError("this FLUX transformer has no guidance embedding; guide it with uncond and omega (true CFG)")
    if (uncond is None) != (omega is None):
        raise ValueError("classifier-free guidance needs both uncond and omega (or neither)")
    if uncond is not None and uncond.encoder_hidden_states.shape != cond.encoder_hidden_states.shape:
        raise ValueError("uncond and cond text tokens must have the same shape (pad both to one length)")
    both = None if uncond is None else uncond.cat(cond)  # [uncond; cond]
    dtype = transformer.dtype

    def forward(tokens: Tensor, t: Tensor, c: FluxConditioning, latent_hw) -> Tensor:
        g = None
        if embeds:  # float32 as FluxPipeline passes it; the transformer casts it to its dtype and multiplies by 1000
            g = torch.as_tensor(guidance, dtype=torch.float32, device=tokens.device)
            n = tokens.shape[0]
            g = g.expand(n) if g.ndim == 0 else g.repeat(n // g.shape[0])  # (B,) g: once per CFG half
        text = c.encoder_hidden_states
        return transformer(
            hidden_states=tokens.to(dtype), timestep=t.to(dtype), guidance=g,
            encoder_hidden_states=text.to(dtype), pooled_projections=c.pooled_projections.to(dtype),
            txt_ids=torch.zeros(text.shape[1], 3, device=tokens.device, dtype=dtype),
            img_ids=latent_image_ids(latent_hw, tokens.device, dtype), return_dict=False)[0]

    def denoiser(x_sigma: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        x_sigma = x_sigma.to(torch.promote_types(x_sigma.dtype, torch.float32))
        sigma = as_sigma_batch(sigma, x_sigma)
        # FluxPipeline's timestep: t = σ·T, divided by T before the call (the transformer multiplies back); the
        # same two roundings in x's dtype
        t = timestep_from_sigma(sigma, num_train_timesteps) / num_train_timesteps
        hw = tuple(x_sigma.shape[2:])
        tokens = pack_latents(x_sigma)
        if both is None:
            v = forward(tokens, t, cond, hw).to(x_sigma.dtype)
        else:
            v_uncond, v_cond = forward(torch.cat([tokens, tokens]), torch.cat([t, t]), both, hw).to(
                x_sigma.dtype).chunk(2)
            om = torch.as_tensor(omega, dtype=x_sigma.dtype, device=x_sigma.device)
            v = cfg(v_cond, v_uncond, append_dims(om, v_cond.ndim) if om.ndim else om)
        v = unpack_latents(v, hw)
        return x0_from_velocity(x_sigma, v, sigma), v

    return denoiser


def packed_denoiser(denoiser: FlowDenoiser, latent_hw: tuple[int, int]) -> FlowDenoiser:
    """The same denoiser on packed tokens (B, (H/2)·(W/2), 4C): a sampler run over it draws each step's noise in
    FluxPipeline's packed layout, so the same generator gives the same ε per token as diffusers."""

    def on_tokens(tokens: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        x0_hat, v = denoiser(unpack_latents(tokens, latent_hw), sigma)
        return pack_latents(x0_hat), pack_latents(v)

    return on_tokens


# ---------------------------------------------------------------------------------------------------------------
# Schedule and sampling
# ---------------------------------------------------------------------------------------------------------------

def flux_scheduler_sigmas(scheduler_config, steps: int, latent_hw: tuple[int, int]) -> Tensor:
    """The sigma table ``FluxPipeline`` sets, bit for bit: base σ = linspace(1, 1/N, N), shifted by S3 with μ(L)
    from the config's ``base/max_image_seq_len`` and ``base/max_shift`` (eq. S2; L = image tokens) when
    ``use_dynamic_shifting``, else by S1 with the config's ``shift``; then 0. float32: the flow schedulers cast
    sigmas they are given to float32 before shifting, so the shift is computed in float32 too (same operations,
    same order). Scheduler options that reshape the table further are refused."""
    get = scheduler_config.get
    for option in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "shift_terminal",
                   "use_flow_sigmas", "invert_sigmas"):
        if get(option):
            raise LcmkitError(f"scheduler option {option} is not supported for FLUX sampling")
    if get("time_shift_type", "exponential") != "exponential":
        raise LcmkitError(f"time_shift_type {get('time_shift_type')!r}: only FLUX's exponential shift is supported")
    base = np.linspace(1.0, 1.0 / steps, steps)  # numpy's float64 linspace, as the pipeline's
    common = dict(sigmas=base, num_train_timesteps=get("num_train_timesteps", 1000), dtype=torch.float32)
    if get("use_dynamic_shifting", False):
        mu = dynamic_shift_mu(image_seq_len(latent_hw), get("base_image_seq_len", 256), get("max_image_seq_len", 4096),
                              get("base_shift", 0.5), get("max_shift", FLUX_DEFAULT_MAX_SHIFT))
        return flow_sigmas(steps, mu=mu, **common)
    return flow_sigmas(steps, shift=get("shift", 1.0), **common)


def latent_size(pipe, height: int | None, width: int | None) -> tuple[int, int]:
    """FluxPipeline's latent (H, W) for an image size: 2·⌊size / (2·vae_scale_factor)⌋ (even, for 2×2 packing);
    the default image is ``default_sample_size · vae_scale_factor`` (1024 px)."""
    f = pipe.vae_scale_factor
    height = height or pipe.default_sample_size * f
    width = width or pipe.default_sample_size * f
    return 2 * (int(height) // (f * 2)), 2 * (int(width) // (f * 2))


@torch.no_grad()
def sample_flux(pipe, prompt: str | list[str], *, steps: int = 4, guidance_scale: float | None = None,
                true_cfg_scale: float = 1.0, negative_prompt: str | list[str] | None = None, sampler: str = "lcm",
                generator: Generators = None, noise_generator: Generators = None, height: int | None = None,
                width: int | None = None, max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
                output_type: str = "pil"):
    """Text-to-image on a ``FluxPipeline`` with an lcmkit flow sampler (``lcm``, ``euler``, ``heun``), by
    :func:`lcmkit.flow_pipelines.sample_flow_latents`.

    ``guidance_scale``: the embedded g of a guidance-distilled transformer (default 3.5, as diffusers); refused for
    a transformer without the embedding. ``true_cfg_scale`` > 1: true CFG with ``negative_prompt`` (default ""; the
    pipeline itself skips CFG silently when no negative prompt is given). The initial latent is drawn from
    ``generator`` as ``FluxPipeline.prepare_latents`` draws it (unpacked shape, then packed); the LCM sampler's
    per-step ε from ``noise_generator`` (default ``generator``) in the packed layout. As with SD3, diffusers' FLUX
    pipeline draws that ε from torch's global RNG: ``noise_generator=torch.default_generator`` after
    ``torch.manual_seed(s)`` reproduces its image. ``output_type="latent"`` returns (B, C, H, W) latents
    (the pipeline returns them packed).
    """
    from .flow_pipelines import sample_flow_latents

    transformer = pipe.transformer
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if transformer.config.guidance_embeds:
        guidance_scale = DEFAULT_FLUX_GUIDANCE if guidance_scale is None else guidance_scale
    elif guidance_scale is not None:
        raise ValueError("this FLUX transformer has no guidance embedding (schnell-like): use true_cfg_scale with a "
                         "negative prompt instead of guidance_scale")
    guided = true_cfg_scale > 1
    cond, uncond = flux_conditioning(pipe, prompts, negative_prompt, guided, max_sequence_length)
    hw = latent_size(pipe, height, width)
    sigmas = flux_scheduler_sigmas(pipe.scheduler.config, steps, hw).to(transformer.device)
    latents = sample_flow_latents(pipe, cond, uncond, true_cfg_scale - 1 if guided else None, sampler, sigmas,
                                  generator, (transformer.config.in_channels // 4, *hw), guidance=guidance_scale,
                                  noise_generator=noise_generator)
    if output_type == "latent":
        return latents
    latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    image = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type=output_type)
