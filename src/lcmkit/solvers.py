"""Teacher one-step ODE solvers Ψ and few-step consistency samplers, each in a registry.

The one contract everything here touches is the **denoiser**: a callable ``denoiser(x_t, t) -> (x0_hat, eps_hat)``
with x_t of shape (B, C, H, W) and t of shape (B,) (long timesteps, or float for DPM-Solver's intermediate
points). Guidance is applied inside the denoiser (see :mod:`lcmkit.denoisers`), so a solver never knows whether
its model is guided: Ψ of a CFG denoiser is exactly the paper's augmented-PF-ODE solver
ẑ_{t_n} = z + (1+ω)·Ψ(z, c) − ω·Ψ(z, ∅) for the first-order solver, and its natural second-order extension.

A schedule is an ``alphas_cumprod`` table (:mod:`lcmkit.math.schedule`). λ_t = log(α_t/σ_t); a step goes from
t (noisier) to s (cleaner), h = λ_s − λ_t > 0.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from .math.consistency import boundary_scalings
from .math.schedule import alpha_sigma, append_dims, log_snr, timestep_from_log_snr

Denoiser = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
Generators = torch.Generator | Sequence[torch.Generator] | None


def _coeffs(alphas_cumprod: Tensor, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """α_t, σ_t, λ_t for per-sample t, shaped to broadcast against x, in x's dtype."""
    alpha, sigma = alpha_sigma(alphas_cumprod, t)
    lam = log_snr(alphas_cumprod, t)
    return tuple(append_dims(v, x.ndim).to(device=x.device, dtype=x.dtype) for v in (alpha, sigma, lam))


def _as_batch(t: Tensor | int | float, x: Tensor) -> Tensor:
    t = torch.as_tensor(t, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


# ---------------------------------------------------------------------------------------------------------------
# Teacher one-step solvers Ψ(x_t, t → s): used by latent consistency distillation to estimate ẑ_{t_n}.
# ---------------------------------------------------------------------------------------------------------------

def ddim_step(denoiser: Denoiser, x_t: Tensor, t: Tensor, s: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """DDIM (Song et al. 2021, η = 0), = first-order DPM-Solver: x_s = α_s·x̂0 + σ_s·ε̂.

    Cost: 1 teacher evaluation (a CFG denoiser makes it one batched conditional + unconditional forward).
    """
    t, s = _as_batch(t, x_t), _as_batch(s, x_t)
    x0, eps = denoiser(x_t, t)
    alpha_s, sigma_s, _ = _coeffs(alphas_cumprod, s, x_t)
    return alpha_s * x0 + sigma_s * eps


def _midpoint(alphas_cumprod: Tensor, t: Tensor, s: Tensor, r: float = 0.5) -> Tensor:
    """The intermediate time s1 with λ_{s1} = λ_t + r·h, on the teacher's integer grid where possible.

    The nearest integer timestep is used (the teacher was trained on integers); where rounding lands on t or s
    (adjacent timesteps, k = 1) the exact float time on the interpolated schedule is used instead. The solvers
    then use the exact r1 = (λ_{s1} − λ_t)/h of the point taken, so the update stays second order.
    """
    lam_t, lam_s = log_snr(alphas_cumprod, t), log_snr(alphas_cumprod, s)
    lam_mid = lam_t + r * (lam_s - lam_t)
    s1 = timestep_from_log_snr(alphas_cumprod, lam_mid, discrete=True).to(alphas_cumprod.dtype)
    collide = (s1 == t.to(s1.dtype)) | (s1 == s.to(s1.dtype))
    s1_float = timestep_from_log_snr(alphas_cumprod, lam_mid, discrete=False)
    return torch.where(collide, s1_float, s1)


def dpm_solver_2_step(denoiser: Denoiser, x_t: Tensor, t: Tensor, s: Tensor, alphas_cumprod: Tensor,
                      r1: float = 0.5) -> Tensor:
    """Single-step DPM-Solver-2 (noise prediction; Lu et al. 2022, arXiv 2206.00927, Algorithm 1).

        u   = (α_{s1}/α_t)·x_t − σ_{s1}·(e^{r1·h} − 1)·ε_t
        x_s = (α_s/α_t)·x_t − σ_s·(e^h − 1)·ε_t − σ_s/(2·r1)·(e^h − 1)·(ε(u, s1) − ε_t)

    Cost: 2 teacher evaluations (at t and at the λ-midpoint s1).
    """
    t, s = _as_batch(t, x_t), _as_batch(s, x_t)
    s1 = _midpoint(alphas_cumprod, t, s, r1)
    alpha_t, _, lam_t = _coeffs(alphas_cumprod, t, x_t)
    alpha_s, sigma_s, lam_s = _coeffs(alphas_cumprod, s, x_t)
    alpha_1, sigma_1, lam_1 = _coeffs(alphas_cumprod, s1, x_t)
    h = lam_s - lam_t
    r = (lam_1 - lam_t) / h
    _, eps_t = denoiser(x_t, t)
    u = (alpha_1 / alpha_t) * x_t - sigma_1 * torch.expm1(r * h) * eps_t
    _, eps_1 = denoiser(u, s1)
    return (alpha_s / alpha_t) * x_t - sigma_s * torch.expm1(h) * (eps_t + (eps_1 - eps_t) / (2.0 * r))


def dpm_solver_pp_2s_step(denoiser: Denoiser, x_t: Tensor, t: Tensor, s: Tensor, alphas_cumprod: Tensor,
                          r1: float = 0.5) -> Tensor:
    """Single-step DPM-Solver++(2S) (data prediction; Lu et al. 2022b, arXiv 2211.01095, Algorithm 1).

        u   = (σ_{s1}/σ_t)·x_t − α_{s1}·(e^{−r1·h} − 1)·x̂0_t
        D   = (1 − 1/(2·r1))·x̂0_t + 1/(2·r1)·x̂0(u, s1)
        x_s = (σ_s/σ_t)·x_t − α_s·(e^{−h} − 1)·D

    Cost: 2 teacher evaluations (at t and at the λ-midpoint s1).
    """
    # same shape as dpm_solver_2_step on purpose: each solver reads as its paper's Algorithm 1, line by line
    t, s = _as_batch(t, x_t), _as_batch(s, x_t)
    s1 = _midpoint(alphas_cumprod, t, s, r1)
    _, sigma_t, lam_t = _coeffs(alphas_cumprod, t, x_t)
    alpha_s, sigma_s, lam_s = _coeffs(alphas_cumprod, s, x_t)
    alpha_1, sigma_1, lam_1 = _coeffs(alphas_cumprod, s1, x_t)
    h = lam_s - lam_t
    r = (lam_1 - lam_t) / h
    x0_t, _ = denoiser(x_t, t)
    u = (sigma_1 / sigma_t) * x_t - alpha_1 * torch.expm1(-r * h) * x0_t
    x0_1, _ = denoiser(u, s1)
    d = x0_t + (x0_1 - x0_t) / (2.0 * r)
    return (sigma_s / sigma_t) * x_t - alpha_s * torch.expm1(-h) * d


#: name → Ψ(denoiser, x_t, t, s, alphas_cumprod) -> x_s
SOLVERS: dict[str, Callable[..., Tensor]] = {
    "ddim": ddim_step,
    "dpm-solver": dpm_solver_2_step,
    "dpm-solver++": dpm_solver_pp_2s_step,
}
#: teacher evaluations per Ψ step (each one batched conditional + unconditional forward under CFG)
TEACHER_EVALUATIONS = {"ddim": 1, "dpm-solver": 2, "dpm-solver++": 2}


def get_solver(name: str) -> Callable[..., Tensor]:
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; expected one of {', '.join(SOLVERS)}")
    return SOLVERS[name]


# ---------------------------------------------------------------------------------------------------------------
# Few-step samplers from a consistency model.
# ---------------------------------------------------------------------------------------------------------------

def randn(shape: Sequence[int], generator: Generators, device, dtype) -> Tensor:
    """N(0, I) noise drawn as diffusers' ``randn_tensor`` draws it: one generator for the whole batch, or a list
    with one generator per batch element (element i then depends only on generator i)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=device, dtype=dtype) for g in generator])
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


def sample_lcm(denoiser: Denoiser, x: Tensor, timesteps: Sequence[int], alphas_cumprod: Tensor,
               generator: Generators = None, callback: Callable[[int], None] | None = None) -> Tensor:
    """LCM multistep sampling (LCM paper, Algorithm 3; diffusers ``LCMScheduler.step``).

    For each τ_i: x̂0 = f_θ(x, τ_i) (boundary-conditioned); unless it is the last step,
    x ← α_{τ_{i+1}}·x̂0 + σ_{τ_{i+1}}·ε with fresh ε from ``generator``. The last step returns f_θ itself.
    """
    if len(timesteps) == 0:
        raise ValueError("sample_lcm needs at least one timestep")
    # every step's scalars at once, before the loop (the same values consistency_function and alpha_sigma give
    # step by step): c_skip, c_out at τ_i, and α, σ of τ_{i+1} for the re-noising
    ts = torch.as_tensor([int(t) for t in timesteps])
    c_skip, c_out = (c.to(x.device).unbind() for c in boundary_scalings(ts, dtype=x.dtype))
    alpha, sigma = (v.to(x.device, x.dtype).unbind()
                    for v in alpha_sigma(alphas_cumprod, ts.to(alphas_cumprod.device)))
    batch_t = [_as_batch(int(t), x) for t in timesteps]
    for i in range(len(timesteps)):
        x0_hat, _ = denoiser(x, batch_t[i])
        denoised = c_skip[i] * x + c_out[i] * x0_hat
        if callback is not None:
            callback(i)
        if i == len(timesteps) - 1:
            return denoised
        noise = randn(x.shape, generator, x.device, denoised.dtype)
        x = alpha[i + 1] * denoised + sigma[i + 1] * noise


def sample_tcd(denoiser: Denoiser, x: Tensor, timesteps: Sequence[int], alphas_cumprod: Tensor,
               generator: Generators = None, gamma: float = 0.3,
               callback: Callable[[int], None] | None = None) -> Tensor:
    """TCD strategic stochastic sampling (Zheng et al. 2024; diffusers ``TCDScheduler.step``, γ = ``eta``).

    s = ⌊(1 − γ)·t_prev⌋ (t_prev = 0 on the last step); x_s = α_s·x̂0 + σ_s·ε̂; if γ > 0 and not last,
    x ← √(ᾱ_prev/ᾱ_s)·x_s + √(1 − ᾱ_prev/ᾱ_s)·ε (forward diffusion back up to t_prev), else x ← x_s.
    γ = 0 is deterministic; γ = 1 is LCM-style multistep sampling without the boundary scalings.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma (eta) must be in [0, 1], got {gamma}")
    for i, t in enumerate(timesteps):
        last = i == len(timesteps) - 1
        t_prev = 0 if last else int(timesteps[i + 1])
        # computed as diffusers does (float32 tensor arithmetic) so the floor lands on the same integer
        s = int(torch.floor((1 - gamma) * torch.tensor(t_prev)).long())
        x0_hat, eps_hat = denoiser(x, _as_batch(int(t), x))
        alpha_s, sigma_s = (v.to(x.dtype) for v in alpha_sigma(alphas_cumprod, s))
        x_s = alpha_s * x0_hat + sigma_s * eps_hat
        if callback is not None:
            callback(i)
        if gamma > 0 and not last:
            ratio = (alphas_cumprod[t_prev] / alphas_cumprod[s]).to(x.dtype)
            noise = randn(x.shape, generator, x.device, x_s.dtype)
            x = ratio.sqrt() * x_s + (1 - ratio).sqrt() * noise
        else:
            x = x_s
    return x


#: name → sample(denoiser, x_T, timesteps, alphas_cumprod, generator, **kwargs) -> x0
SAMPLERS: dict[str, Callable[..., Tensor]] = {"lcm": sample_lcm, "tcd": sample_tcd}
