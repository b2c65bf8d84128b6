"""The consistency function's boundary condition (LCM paper, eq. 2; Song et al. 2023, eq. 7).

f_θ(z, ω, c, t) = c_skip(t)·z + c_out(t)·x̂0(z, ω, c, t) with the discrete-time scalings of the LCM code
(diffusers ``LCMScheduler.get_scalings_for_boundary_condition_discrete``): s = timestep_scaling·t, σ_data = 0.5,
c_skip = σ_data² / (s² + σ_data²), c_out = s / √(s² + σ_data²). At t = 0: c_skip = 1, c_out = 0, so f(z, 0) = z.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .schedule import append_dims

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0


def boundary_scalings(t: Tensor | int | float, sigma_data: float = SIGMA_DATA,
                      timestep_scaling: float = TIMESTEP_SCALING,
                      dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out) at discrete timestep(s) ``t``, returned in ``dtype``.

    Computed in at least float32 and cast once: s² = (10·999)² ≈ 1e8 overflows float16, where c_skip and c_out
    would both become 0 (an fp16 LCM would sample the zero latent whatever the model)."""
    s = torch.as_tensor(t, dtype=torch.promote_types(dtype, torch.float32)) * timestep_scaling
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s / (s**2 + sigma_data**2).sqrt()
    return c_skip.to(dtype), c_out.to(dtype)


def consistency_function(x_t: Tensor, x0_hat: Tensor, t: Tensor | int, sigma_data: float = SIGMA_DATA,
                         timestep_scaling: float = TIMESTEP_SCALING) -> Tensor:
    """f = c_skip(t)·x_t + c_out(t)·x̂0; ``t`` a scalar or one timestep per sample (B,)."""
    c_skip, c_out = boundary_scalings(t, sigma_data, timestep_scaling, dtype=x_t.dtype)
    c_skip, c_out = (append_dims(c.to(x_t.device), x_t.ndim) if c.ndim else c for c in (c_skip, c_out))
    return c_skip * x_t + c_out * x0_hat
