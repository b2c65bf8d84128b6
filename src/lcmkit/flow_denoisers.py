"""Adapters from a diffusers ``SD3Transformer2DModel`` to the flow denoiser contract, and SD3 sampling.

The contract (:mod:`lcmkit.flow_solvers`): ``denoiser(x_sigma, sigma) -> (x0_hat, v_hat)``, x_σ (B, C, H, W),
σ (B,) float. The transformer is called with timestep t = σ·1000 (as ``StableDiffusion3Pipeline`` passes
``scheduler.timesteps``) and predicts the velocity v ≈ ε − x0; x̂0 = x_σ − σ·v (eq. F3 of :mod:`lcmkit.math.flow`).

Guidance: the paper's ω (0 = conditional only; ω = diffusers' ``guidance_scale − 1``), applied to v as
(1 + ω)·v_c − ω·v_∅ in ONE batched forward laid out [uncond; cond], as the SD3 pipeline does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .flow_solvers import FlowDenoiser, as_sigma_batch, get_flow_sampler
from .math.flow import dynamic_shift_mu, flow_sigmas, timestep_from_sigma, x0_from_velocity
from .math.guidance import cfg
from .math.schedule import append_dims
from .solvers import Generators, randn


@dataclass(frozen=True)
class SD3Conditioning:
    """What an SD3 transformer sees besides (x_σ, t), batched along dim 0: the joint text tokens
    ``encoder_hidden_states`` (B, L, D) (CLIP-L ‖ CLIP-G, zero-padded to D, then T5's tokens or zeros without T5)
    and the ``pooled_projections`` (B, P) (both CLIPs' pooled outputs)."""

    encoder_hidden_states: Tensor
    pooled_projections: Tensor

    def __len__(self) -> int:
        return self.encoder_hidden_states.shape[0]

    def cat(self, other: "SD3Conditioning") -> "SD3Conditioning":
        return SD3Conditioning(torch.cat([self.encoder_hidden_states, other.encoder_hidden_states]),
                               torch.cat([self.pooled_projections, other.pooled_projections]))


def sd3_denoiser(transformer, cond: SD3Conditioning, *, uncond: SD3Conditioning | None = None,
                 omega: Tensor | float | None = None, num_train_timesteps: int = 1000) -> FlowDenoiser:
    """Wrap an ``SD3Transformer2DModel`` as ``denoiser(x_sigma, sigma) -> (x0_hat, v_hat)``.

    ``uncond`` and ``omega`` (float or (B,)) together turn on CFG on the velocity. Outputs are in x_σ's dtype
    promoted to at least float32; the transformer runs in its own dtype.
    """
    if (uncond is None) != (omega is None):
        raise ValueError("classifier-free guidance needs both uncond and omega (or neither)")
    if uncond is not None and len(uncond) != len(cond):
        raise ValueError(f"uncond batch {len(uncond)} != cond batch {len(cond)}")
    both = None if uncond is None else uncond.cat(cond)  # [uncond; cond], the SD3 pipeline's layout
    dtype = transformer.dtype

    def forward(x: Tensor, t: Tensor, c: SD3Conditioning) -> Tensor:
        return transformer(hidden_states=x.to(dtype), timestep=t.to(dtype),
                           encoder_hidden_states=c.encoder_hidden_states.to(dtype),
                           pooled_projections=c.pooled_projections.to(dtype), return_dict=False)[0]

    def denoiser(x_sigma: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        x_sigma = x_sigma.to(torch.promote_types(x_sigma.dtype, torch.float32))
        sigma = as_sigma_batch(sigma, x_sigma)
        t = timestep_from_sigma(sigma, num_train_timesteps)
        if both is None:
            v = forward(x_sigma, t, cond).to(x_sigma.dtype)
        else:
            v_uncond, v_cond = forward(torch.cat([x_sigma, x_sigma]), torch.cat([t, t]), both).to(
                x_sigma.dtype).chunk(2)
            om = torch.as_tensor(omega, dtype=x_sigma.dtype, device=x_sigma.device)
            v = cfg(v_cond, v_uncond, append_dims(om, x_sigma.ndim) if om.ndim else om)
        return x0_from_velocity(x_sigma, v, sigma), v

    return denoiser


def scheduler_sigmas(scheduler_config, steps: int, latent_hw: tuple[int, int], patch_size: int) -> Tensor:
    """The sigma table the SD3 pipeline sets on its scheduler: fixed ``shift``, or, with ``use_dynamic_shifting``,
    μ from the latent sequence length (H/p)·(W/p) with the config's base/max shift (the SD3 pipeline's
    ``calculate_shift`` defaults: 0.5 and 1.16)."""
    get = scheduler_config.get
    if get("use_dynamic_shifting", False):
        seq = (latent_hw[0] // patch_size) * (latent_hw[1] // patch_size)
        mu = dynamic_shift_mu(seq, get("base_image_seq_len", 256), get("max_image_seq_len", 4096),
                              get("base_shift", 0.5), get("max_shift", 1.16))
        return flow_sigmas(steps, mu=mu, num_train_timesteps=get("num_train_timesteps", 1000))
    return flow_sigmas(steps, shift=get("shift", 1.0), num_train_timesteps=get("num_train_timesteps", 1000))


@torch.no_grad()
def sample_sd3(pipe, prompt: str | list[str], *, steps: int = 4, guidance_scale: float = 1.0,
               negative_prompt: str | list[str] | None = None, sampler: str = "lcm",
               generator: Generators = None, noise_generator: Generators = None, height: int | None = None,
               width: int | None = None, output_type: str = "pil"):
    """Text-to-image on a ``StableDiffusion3Pipeline`` (T5 may be absent) with an lcmkit flow sampler.

    The initial latent is drawn from ``generator`` as diffusers' ``prepare_latents`` draws it; the LCM sampler's
    per-step ε from ``noise_generator`` (default: ``generator``, so image i depends only on its own generator).
    diffusers' SD3 and FLUX pipelines do not pass their generator to ``scheduler.step``, so
    ``FlowMatchLCMScheduler`` draws that ε from torch's global RNG: ``noise_generator=torch.default_generator``
    after ``torch.manual_seed(s)`` reproduces their image for the same seeds; ``"euler"`` draws nothing after the
    latent and reproduces ``FlowMatchEulerDiscreteScheduler``'s image from ``generator`` alone. ``guidance_scale``
    is diffusers' g; g > 1 runs CFG on v.
    """
    device = pipe.transformer.device
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    do_cfg = guidance_scale > 1
    emb, neg_emb, pooled, neg_pooled = pipe.encode_prompt(
        prompts, None, None, device=device, do_classifier_free_guidance=do_cfg, negative_prompt=negative_prompt)
    cond = SD3Conditioning(emb, pooled)
    uncond = SD3Conditioning(neg_emb, neg_pooled) if do_cfg else None
    denoiser = sd3_denoiser(pipe.transformer, cond, uncond=uncond, omega=guidance_scale - 1 if do_cfg else None,
                            num_train_timesteps=pipe.scheduler.config.get("num_train_timesteps", 1000))
    f = pipe.vae_scale_factor
    height = height or pipe.default_sample_size * f
    width = width or pipe.default_sample_size * f
    shape = (len(prompts), pipe.transformer.config.in_channels, height // f, width // f)
    x = randn(shape, generator, device, emb.dtype)
    sigmas = scheduler_sigmas(pipe.scheduler.config, steps, shape[2:], pipe.transformer.config.patch_size)
    latents = get_flow_sampler(sampler)(denoiser, x, sigmas.to(device),
                                          generator if noise_generator is None else noise_generator).to(emb.dtype)
    if output_type == "latent":
        return latents
    latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    image = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type=output_type)
