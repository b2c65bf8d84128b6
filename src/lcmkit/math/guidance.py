"""Classifier-free guidance in the paper's ω form, and the guidance (w) embedding of a full LCM."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def cfg(cond: Tensor, uncond: Tensor, omega: Tensor | float) -> Tensor:
    """(1 + ω)·cond − ω·uncond (LCM paper, eq. 8). ω = diffusers' guidance_scale − 1; ω = 0 is conditional only.

    Linear, so it applies equally to ε̂, x̂0 or a solver's output. ``omega`` is a float or broadcasts (B,1,1,1).
    """
    return cond + omega * (cond - uncond)


def guidance_embedding(omega: Tensor, dim: int = 256, dtype: torch.dtype = torch.float32,
                       compute_dtype: torch.dtype = torch.float32) -> Tensor:
    """Sinusoidal embedding of ω (LCM paper §4.2; the VDM/Imagen timestep embedding applied to 1000·ω).

    emb(ω) = [sin(1000ω·f_j), cos(1000ω·f_j)], f_j = exp(−ln(10⁴)·j/(d/2 − 1)), j = 0 … d/2 − 1.
    Returns (B, dim); the UNet's ``cond_proj`` (``time_cond_proj_dim``) maps it into the time embedding.
    Computed in float32 by default, as diffusers' ``LatentConsistencyModelPipeline.get_guidance_scale_embedding``
    does (its arguments reach 1000·ω ≈ 10⁴, so float32 rounds them by ~1e-3): a model distilled here then sees
    exactly the embedding that diffusers' pipeline gives it. ``compute_dtype=torch.float64`` gives the exact values.
    """
    omega = torch.as_tensor(omega).reshape(-1).to(compute_dtype) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=compute_dtype) * -(math.log(10000.0) / (half - 1)))
    args = omega[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb.to(dtype)
