"""Adapters from a diffusers ``SD3Transformer2DModel`` to the flow denoiser contract, SD3 text conditioning, and
the scheduler's sigma tables (sampling and distillation grids). Sampling a pipeline: :mod:`lcmkit.flow_pipelines`.

The contract (:mod:`lcmkit.flow_solvers`): ``denoiser(x_sigma, sigma) -> (x0_hat, v_hat)``, x_σ (B, C, H, W),
σ (B,) float. The transformer is called with timestep t = σ·1000 (as ``StableDiffusion3Pipeline`` passes
``scheduler.timesteps``) and predicts the velocity v ≈ ε − x0; x̂0 = x_σ − σ·v (eq. F3 of :mod:`lcmkit.math.flow`).

Guidance: the paper's ω (0 = conditional only; ω = diffusers' ``guidance_scale − 1``), applied to v as
(1 + ω)·v_c − ω·v_∅ in ONE batched forward laid out [uncond; cond], as the SD3 pipeline does.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from .flow_attention import collapse_zero_tokens, collapsed_attention
from .flow_solvers import FlowDenoiser, as_sigma_batch
from .math.flow import dynamic_shift_mu, flow_sigmas, flow_training_grid, timestep_from_sigma, x0_from_velocity
from .math.guidance import cfg
from .math.schedule import append_dims


@dataclass(frozen=True)
class FlowConditioning:
    """What a flow transformer sees besides (x_σ, t), batched along dim 0: text tokens ``encoder_hidden_states``
    (B, L, D) and a pooled text vector ``pooled_projections`` (B, P). SD3: CLIP-L ‖ CLIP-G tokens zero-padded to D,
    then T5's tokens or zeros without T5, and both CLIPs' pooled outputs; FLUX: T5's tokens and CLIP-L's pooled
    output (:func:`lcmkit.flux.flux_conditioning`)."""

    encoder_hidden_states: Tensor
    pooled_projections: Tensor

    def __len__(self) -> int:
        return self.encoder_hidden_states.shape[0]

    def cat(self, other: "FlowConditioning") -> "FlowConditioning":
        return FlowConditioning(torch.cat([self.encoder_hidden_states, other.encoder_hidden_states]),
                                torch.cat([self.pooled_projections, other.pooled_projections]))

    def repeat(self, n: int) -> "FlowConditioning":
        """A batch-1 conditioning repeated to batch n."""
        return FlowConditioning(*(x.expand(n, *x.shape[1:]).contiguous()
                                  for x in (self.encoder_hidden_states, self.pooled_projections)))


#: SD3's conditioning is the flow one (the name the SD3 code and its callers use)
SD3Conditioning = FlowConditioning


@contextlib.contextmanager
def truncation_quiet(pipe):
    """The pipeline's own ``encode_prompt`` without its warning for each prompt longer than a tokenizer's limit:
    such prompts are truncated, as lcmkit's SD / SDXL encoders truncate (a training run's caption cache would
    otherwise print one warning per chunk)."""
    log = logging.getLogger(type(pipe).__module__)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


@torch.no_grad()
def sd3_conditioning(pipe, prompts: list[str], negative_prompt: str | list[str] | None = None,
                     guided: bool = False) -> tuple[SD3Conditioning, SD3Conditioning | None]:
    """(cond, uncond) of ``prompts`` by the pipeline's own ``encode_prompt`` (CLIP-L ‖ CLIP-G, T5 or zeros);
    ``uncond`` (the negative prompt, "" by default, as the SD3 pipeline encodes it) only when ``guided``."""
    encoder = pipe.text_encoder if pipe.text_encoder is not None else pipe.text_encoder_2
    with truncation_quiet(pipe):
        emb, neg_emb, pooled, neg_pooled = pipe.encode_prompt(
            prompts, None, None, device=next(encoder.parameters()).device, do_classifier_free_guidance=guided,
            negative_prompt=negative_prompt)
    return SD3Conditioning(emb, pooled), SD3Conditioning(neg_emb, neg_pooled) if guided else None


def sd3_denoiser(transformer, cond: SD3Conditioning, *, uncond: SD3Conditioning | None = None,
                 omega: Tensor | float | None = None, guidance: None = None,
                 num_train_timesteps: int = 1000, collapse_padding: bool = True) -> FlowDenoiser:
    """Wrap an ``SD3Transformer2DModel`` as ``denoiser(x_sigma, sigma) -> (x0_hat, v_hat)``.

    ``uncond`` and ``omega`` (float or (B,)) together turn on CFG on the velocity. ``guidance`` (an embedded
    guidance scale, :func:`lcmkit.flux.flux_denoiser`'s) must be None: SD3 has no guidance embedding. Outputs are in
    x_σ's dtype promoted to at least float32; the transformer runs in its own dtype. With ``collapse_padding`` (and
    diffusers' default joint attention in place) the all-zero context tokens at the end, SD3's T5 slots without T5,
    go through the transformer as one token of their multiplicity (:mod:`lcmkit.flow_attention`): the same output
    up to rounding, without 256 identical tokens in every block.
    """
    if guidance is not None:
        raise ValueError("an SD3 transformer has no guidance embedding; guide it with uncond and omega (CFG on v)")
    if (uncond is None) != (omega is None):
        raise ValueError("classifier-free guidance needs both uncond and omega (or neither)")
    if uncond is not None and len(uncond) != len(cond):
        raise ValueError(f"uncond batch {len(uncond)} != cond batch {len(cond)}")
    both = None if uncond is None else uncond.cat(cond)  # [uncond; cond], the SD3 pipeline's layout
    dtype = transformer.dtype

    def forward(x: Tensor, t: Tensor, c: SD3Conditioning) -> Tensor:
        context, multiplicity = c.encoder_hidden_states.to(dtype), None
        if collapse_padding and uses_default_attention(transformer):
            context, multiplicity = collapse_zero_tail(context)
        kwargs = dict(hidden_states=x.to(dtype), timestep=t.to(dtype), encoder_hidden_states=context,
                      pooled_projections=c.pooled_projections.to(dtype), return_dict=False)
        if multiplicity is None:
            return transformer(**kwargs)[0]
        with collapsed_attention(transformer):
            return transformer(**kwargs, joint_attention_kwargs={"context_multiplicity": multiplicity})[0]

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


def collapse_zero_tail(context: Tensor) -> tuple[Tensor, Tensor | None]:
    """``(context, None)``, or with two or more all-zero tokens at the end (over the whole batch) the context up to
    the first of them plus one, and their multiplicities (:func:`lcmkit.flow_attention.collapse_zero_tokens`)."""
    nonzero = (context != 0).any(dim=0).any(dim=-1)  # (L,): token j is non-zero somewhere in the batch
    kept = int(nonzero.nonzero().max()) + 1 if nonzero.any() else 0
    if context.shape[1] - kept < 2:
        return context, None
    return collapse_zero_tokens(context, kept)


def uses_default_attention(transformer) -> bool:
    """True when every attention layer runs diffusers' joint attention (no fused-QKV or custom processor that
    :class:`lcmkit.flow_attention.CollapsedJointAttnProcessor` would replace)."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    return all(type(p) is JointAttnProcessor2_0 for p in transformer.attn_processors.values())


#: the max_shift the SD3 pipeline's ``calculate_shift`` call falls back to (FluxPipeline's: 1.15)
SD3_DEFAULT_MAX_SHIFT = 1.16


def _shift_mu(scheduler_config, latent_hw: tuple[int, int], patch_size: int,
              default_max_shift: float = SD3_DEFAULT_MAX_SHIFT) -> float | None:
    """μ of eq. S2 for a scheduler with ``use_dynamic_shifting``: from the latent sequence length (H/p)·(W/p) and
    the config's base/max shift (defaults 0.5 and ``default_max_shift``, as the pipeline falls back to); None
    without."""
    get = scheduler_config.get
    if not get("use_dynamic_shifting", False):
        return None
    seq = (latent_hw[0] // patch_size) * (latent_hw[1] // patch_size)
    return dynamic_shift_mu(seq, get("base_image_seq_len", 256), get("max_image_seq_len", 4096),
                            get("base_shift", 0.5), get("max_shift", default_max_shift))


def scheduler_sigmas(scheduler_config, steps: int, latent_hw: tuple[int, int], patch_size: int) -> Tensor:
    """The sigma table the SD3 pipeline sets on its scheduler: fixed ``shift`` (eq. S1), or, with
    ``use_dynamic_shifting``, eq. S3 with μ of the latent size (:func:`_shift_mu`)."""
    mu = _shift_mu(scheduler_config, latent_hw, patch_size)
    return flow_sigmas(steps, shift=scheduler_config.get("shift", 1.0), mu=mu,
                       num_train_timesteps=scheduler_config.get("num_train_timesteps", 1000))


def scheduler_training_grid(scheduler_config, skip: int, latent_hw: tuple[int, int], patch_size: int,
                            default_max_shift: float = SD3_DEFAULT_MAX_SHIFT) -> Tensor:
    """The distillation grid σ_0 = 0 < σ_1 < … < σ_N (:func:`lcmkit.math.flow.flow_training_grid`, skip k) on the
    same shifted table the pipeline samples with: fixed ``shift``, or μ of the latent size (FLUX: ``patch_size`` 2,
    its 2×2 packing, and ``default_max_shift`` 1.15, FluxPipeline's fallback)."""
    mu = _shift_mu(scheduler_config, latent_hw, patch_size, default_max_shift)
    return flow_training_grid(scheduler_config.get("num_train_timesteps", 1000), skip,
                              shift=scheduler_config.get("shift", 1.0), mu=mu)
