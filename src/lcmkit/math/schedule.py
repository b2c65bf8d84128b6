"""DDPM noise schedules (Ho et al. 2020) and the VP quantities α_t, σ_t, λ_t derived from them.

A schedule is represented by its ``alphas_cumprod`` table ᾱ_t, t = 0 … T−1, as in diffusers. Integer t indexes
the table; float t (used for DPM-Solver's intermediate points) interpolates log ᾱ_t linearly between neighbours,
the "discrete" schedule of DPM-Solver (Lu et al. 2022, appendix D).
"""

from __future__ import annotations

import torch
from torch import Tensor


def scaled_linear_betas(num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                        dtype: torch.dtype = torch.float64) -> Tensor:
    """Stable Diffusion's β schedule: β_t = linspace(√β_start, √β_end, T)²."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=dtype) ** 2


def linear_betas(num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 dtype: torch.dtype = torch.float64) -> Tensor:
    """DDPM's linear β schedule."""
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=dtype)


def alphas_cumprod_from_betas(betas: Tensor) -> Tensor:
    """ᾱ_t = ∏_{s ≤ t} (1 − β_s)."""
    return torch.cumprod(1.0 - betas, dim=0)


def alphas_cumprod_from_config(config: dict, dtype: torch.dtype = torch.float64) -> Tensor:
    """ᾱ table from a diffusers scheduler config (``beta_schedule``, ``beta_start``, ``beta_end``, ``trained_betas``)."""
    T = int(config.get("num_train_timesteps", 1000))
    if config.get("trained_betas") is not None:
        betas = torch.as_tensor(config["trained_betas"], dtype=dtype)
    elif config.get("beta_schedule", "scaled_linear") == "scaled_linear":
        betas = scaled_linear_betas(T, config.get("beta_start", 0.00085), config.get("beta_end", 0.012), dtype)
    elif config["beta_schedule"] == "linear":
        betas = linear_betas(T, config.get("beta_start", 0.0001), config.get("beta_end", 0.02), dtype)
    else:
        raise ValueError(f"unsupported beta_schedule {config['beta_schedule']!r} (expected scaled_linear or linear)")
    if config.get("rescale_betas_zero_snr"):
        raise ValueError("rescale_betas_zero_snr schedules are not supported (σ_T = 0 breaks λ_t at T−1)")
    return alphas_cumprod_from_betas(betas)


def _log_alphas_cumprod(alphas_cumprod: Tensor, t: Tensor | int | float) -> Tensor:
    t = torch.as_tensor(t, device=alphas_cumprod.device)
    log_ac = torch.log(alphas_cumprod)
    if not torch.is_floating_point(t):
        return log_ac[t]
    # float t: linear interpolation of log ᾱ between the two neighbouring integer timesteps
    t = t.to(alphas_cumprod.dtype).clamp(0, len(alphas_cumprod) - 1)
    lo = t.floor().long()
    hi = (lo + 1).clamp(max=len(alphas_cumprod) - 1)
    w = t - lo
    return log_ac[lo] * (1 - w) + log_ac[hi] * w


def alpha_sigma(alphas_cumprod: Tensor, t: Tensor | int | float) -> tuple[Tensor, Tensor]:
    """α_t = √ᾱ_t and σ_t = √(1 − ᾱ_t); the shape of ``t``, the dtype of the table."""
    ac = torch.exp(_log_alphas_cumprod(alphas_cumprod, t))
    return ac.sqrt(), (1.0 - ac).sqrt()


def log_snr(alphas_cumprod: Tensor, t: Tensor | int | float) -> Tensor:
    """λ_t = log(α_t / σ_t), half the log signal-to-noise ratio (DPM-Solver's λ)."""
    log_ac = _log_alphas_cumprod(alphas_cumprod, t)
    return 0.5 * (log_ac - torch.log(-torch.expm1(log_ac)))


def timestep_from_log_snr(alphas_cumprod: Tensor, lam: Tensor, discrete: bool = True) -> Tensor:
    """Inverse of :func:`log_snr`: the timestep whose λ equals ``lam``.

    λ_t decreases with t. ``discrete=True`` returns the nearest integer timestep (long); otherwise the float t
    on the piecewise-linear log ᾱ schedule used by :func:`alpha_sigma`.
    """
    lam_table = log_snr(alphas_cumprod, torch.arange(len(alphas_cumprod), device=alphas_cumprod.device))
    lam = torch.as_tensor(lam, dtype=lam_table.dtype, device=lam_table.device)
    # searchsorted needs ascending order: flip λ (descending in t)
    asc = lam_table.flip(0)
    idx = torch.searchsorted(asc, lam.clamp(asc[0], asc[-1])).clamp(1, len(asc) - 1)
    # bracket in t: t_hi = T-1-(idx-1) has λ ≤ lam ≤ λ(t_lo)
    t_lo = (len(asc) - 1 - idx).to(lam_table.dtype)
    if discrete:
        t_hi = t_lo + 1
        d_lo = (log_snr(alphas_cumprod, t_lo.long()) - lam).abs()
        d_hi = (log_snr(alphas_cumprod, t_hi.long()) - lam).abs()
        return torch.where(d_lo <= d_hi, t_lo, t_hi).long()
    # invert λ(log ᾱ) exactly, then place log ᾱ linearly between the bracketing integers
    log_ac_target = -torch.nn.functional.softplus(-2.0 * lam)  # log ᾱ = log sigmoid(2λ)
    la_lo = _log_alphas_cumprod(alphas_cumprod, t_lo.long())
    la_hi = _log_alphas_cumprod(alphas_cumprod, (t_lo + 1).long())
    return t_lo + (log_ac_target - la_lo) / (la_hi - la_lo)


def append_dims(x: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims so a per-sample (B,) tensor broadcasts against (B, C, H, W)."""
    return x.reshape(*x.shape, *([1] * (ndim - x.ndim)))
