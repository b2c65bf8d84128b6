"""Rectified-flow (flow-matching) math for SD3 / SD3.5 and FLUX.1 teachers, as pure functions.

Notation (docs/flow-matching.md; diffusers' names in brackets):

- σ ∈ [0, 1] the noise level [``scheduler.sigmas``]; the model's timestep input is t = σ·T, T = 1000
  [``scheduler.timesteps``].
- forward process (eq. F1)  x_σ = (1 − σ)·x0 + σ·ε;
- velocity (eq. F2)         v = dx_σ/dσ = ε − x0, what the transformer predicts [``noise_pred``];
- so (eq. F3)               x0 = x_σ − σ·v,  ε = x_σ + (1 − σ)·v.

Sigma tables (``FlowMatchEulerDiscreteScheduler``): the shift s maps σ ↦ s·σ / (1 + (s − 1)·σ) (eq. S1; SD3/3.5:
s = 3). FLUX shifts by the image sequence length L instead: μ(L) linear from 0.5 at L = 256 to 1.15 at L = 4096
(``calculate_shift``, eq. S2), σ ↦ e^μ / (e^μ + (1/σ − 1)) (exponential time shift, eq. S3), which is
eq. S1 with s = e^μ.

Every function takes σ as a float or a per-sample (B,) tensor (broadcast against x) and computes in x's dtype,
so the tests run them in float64.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ..errors import LcmkitError
from .schedule import append_dims

NUM_TRAIN_TIMESTEPS = 1000
#: FLUX's resolution-dependent shift (diffusers' scheduler config and ``calculate_shift`` defaults)
BASE_SEQ_LEN, MAX_SEQ_LEN, BASE_SHIFT, MAX_SHIFT = 256, 4096, 0.5, 1.15
#: SD3 / SD3.5's fixed shift (their ``scheduler_config.json``)
SD3_SHIFT = 3.0


def _like(sigma: Tensor | float, x: Tensor) -> Tensor:
    """σ as a tensor in x's dtype and device, (B,) σ shaped (B, 1, …) to broadcast against x."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return append_dims(sigma, x.ndim) if sigma.ndim else sigma


# ---------------------------------------------------------------------------------------------------------------
# Sigma tables
# ---------------------------------------------------------------------------------------------------------------

def _in_dtype_of(value: float, sigma: Tensor | float) -> Tensor | float:
    """A constant rounded to σ's dtype first, as numpy rounds a Python float against a float32 array (torch would
    keep it in double inside the kernel): float32 tables then carry diffusers' bits."""
    return torch.as_tensor(value, dtype=sigma.dtype, device=sigma.device) if isinstance(sigma, Tensor) else value


def shift_sigmas(sigma: Tensor, shift: float) -> Tensor:
    """Eq. S1: σ' = s·σ / (1 + (s − 1)·σ). Keeps 0 ↦ 0 and 1 ↦ 1; s > 1 spends more of the schedule at high
    noise."""
    return _in_dtype_of(shift, sigma) * sigma / (1 + _in_dtype_of(shift - 1, sigma) * sigma)


def dynamic_shift_mu(image_seq_len: int, base_seq_len: int = BASE_SEQ_LEN, max_seq_len: int = MAX_SEQ_LEN,
                     base_shift: float = BASE_SHIFT, max_shift: float = MAX_SHIFT) -> float:
    """Eq. S2 (FLUX; diffusers ``calculate_shift``): μ linear in the image sequence length L, from ``base_shift`` at
    ``base_seq_len`` tokens to ``max_shift`` at ``max_seq_len`` (extrapolated beyond). FLUX packs 2×2 latent
    patches, so L = (H/16)·(W/16) for an H×W image (1024² → 4096, μ = 1.15). Computed as m·L + b in diffusers'
    order of operations, so μ, and the sigmas shifted with it, carry the same bits as the pipeline's."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def time_shift_exponential(sigma: Tensor, mu: float) -> Tensor:
    """Eq. S3: σ' = e^μ / (e^μ + (1/σ − 1)), diffusers' ``time_shift_type="exponential"``; = eq. S1, s = e^μ."""
    e_mu = _in_dtype_of(math.exp(mu), sigma)
    return e_mu / (e_mu + (1 / sigma - 1))


def train_sigmas(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, shift: float = 1.0,
                 dtype: torch.dtype = torch.float64) -> Tensor:
    """The scheduler's training table, descending: σ_i = S1(i/T) for i = T, T−1, …, 1 (σ = 1 down to S1(1/T)).

    diffusers builds it at construction (``scheduler.sigmas`` before ``set_timesteps``); with dynamic shifting it
    is left unshifted (``shift=1``). Its ends, σ_max and σ_min, bound the default inference schedule.
    """
    i = torch.arange(num_train_timesteps, 0, -1, dtype=dtype)
    return shift_sigmas(i / num_train_timesteps, shift)


def flow_sigmas(num_inference_steps: int, shift: float = 1.0, mu: float | None = None,
                sigmas: Tensor | np.ndarray | list[float] | None = None,
                num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, dtype: torch.dtype = torch.float64) -> Tensor:
    """The N + 1 sigmas σ_0 > … > σ_{N−1} > σ_N = 0 of ``FlowMatchEulerDiscreteScheduler.set_timesteps``
    (also ``FlowMatchLCMScheduler``'s); timesteps are σ_i·T for i < N.

    Without ``sigmas``: N points uniform in σ between the training table's ends, linspace(σ_max, σ_min, N), where
    σ_min = S1(1/T) is already shifted; then shifted (again): eq. S1 with ``shift``, or eq. S3 with ``mu``
    (dynamic shifting; ``shift`` is then ignored). So with s = 3 the last point is S1(S1(1/T)) ≈ 0.0089, as
    diffusers gives. FluxPipeline passes ``sigmas = linspace(1, 1/N, N)`` and ``mu`` (:func:`flux_sigmas`).
    """
    if num_inference_steps < 1:
        raise LcmkitError(f"steps must be a positive integer, got {num_inference_steps}")
    if sigmas is None:
        table = train_sigmas(num_train_timesteps, shift if mu is None else 1.0, dtype)
        sigmas = torch.linspace(float(table[0]), float(table[-1]), num_inference_steps, dtype=dtype)
    else:
        sigmas = torch.as_tensor(np.asarray(sigmas), dtype=dtype)
    sigmas = shift_sigmas(sigmas, shift) if mu is None else time_shift_exponential(sigmas, mu)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def flux_sigmas(num_inference_steps: int, image_seq_len: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """``FluxPipeline``'s schedule: σ = S3(linspace(1, 1/N, N); μ(L)) then 0 (eqs. S2, S3)."""
    base = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps)
    return flow_sigmas(num_inference_steps, mu=dynamic_shift_mu(image_seq_len), sigmas=base, dtype=dtype)


def timestep_from_sigma(sigma: Tensor, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Tensor:
    """t = σ·T: the timestep SD3's and FLUX's transformers receive from diffusers' pipelines (FLUX's pipeline
    divides by 1000 again before the call; its transformer multiplies back)."""
    return sigma * num_train_timesteps


# ---------------------------------------------------------------------------------------------------------------
# Forward process and parameterisation (eqs. F1–F3)
# ---------------------------------------------------------------------------------------------------------------

def flow_noise(x0: Tensor, eps: Tensor, sigma: Tensor | float) -> Tensor:
    """Eq. F1: x_σ = (1 − σ)·x0 + σ·ε (diffusers ``scale_noise``)."""
    sigma = _like(sigma, x0)
    return (1 - sigma) * x0 + sigma * eps


def velocity_target(x0: Tensor, eps: Tensor) -> Tensor:
    """Eq. F2: v = ε − x0, the flow-matching regression target (independent of σ)."""
    return eps - x0


def x0_from_velocity(x_sigma: Tensor, v: Tensor, sigma: Tensor | float) -> Tensor:
    """Eq. F3: x̂0 = x_σ − σ·v (diffusers' ``x0_pred`` / ``denoised`` in the flow schedulers)."""
    return x_sigma - _like(sigma, x_sigma) * v


def eps_from_velocity(x_sigma: Tensor, v: Tensor, sigma: Tensor | float) -> Tensor:
    """Eq. F3: ε̂ = x_σ + (1 − σ)·v."""
    return x_sigma + (1 - _like(sigma, x_sigma)) * v


def velocity_from_x0(x_sigma: Tensor, x0: Tensor, sigma: Tensor | float) -> Tensor:
    """Inverse of eq. F3 for σ > 0: v = (x_σ − x̂0)/σ."""
    return (x_sigma - x0) / _like(sigma, x_sigma)


# ---------------------------------------------------------------------------------------------------------------
# Teacher steps on the flow ODE dx/dσ = v (a step goes from σ to σ' < σ)
# ---------------------------------------------------------------------------------------------------------------

def euler_flow_step(x_sigma: Tensor, v: Tensor, sigma: Tensor | float, sigma_next: Tensor | float) -> Tensor:
    """Eq. E1: x_σ' = x_σ + (σ' − σ)·v (``FlowMatchEulerDiscreteScheduler.step``). Exact when v is constant along
    the path (straight flows); = (1 − σ')·x̂0 + σ'·ε̂ with eq. F3's x̂0, ε̂, the DDIM step of the flow."""
    return x_sigma + (_like(sigma_next, x_sigma) - _like(sigma, x_sigma)) * v


def heun_flow_step(x_sigma: Tensor, v: Tensor, v_next: Tensor, sigma: Tensor | float,
                   sigma_next: Tensor | float) -> Tensor:
    """Eq. E2, Heun's trapezoid (Karras et al. 2022, Algorithm 1 without churn; ``FlowMatchHeunDiscreteScheduler``):
    x_σ' = x_σ + (σ' − σ)·(v + v')/2, v' the velocity at the Euler predictor (σ', x_σ + (σ' − σ)·v).
    Second order; diffusers takes the plain Euler step where σ' = 0."""
    return x_sigma + (_like(sigma_next, x_sigma) - _like(sigma, x_sigma)) * 0.5 * (v + v_next)


# ---------------------------------------------------------------------------------------------------------------
# Consistency function, distillation grid and the multistep sampler's step
# ---------------------------------------------------------------------------------------------------------------

def flow_consistency_function(x_sigma: Tensor, v: Tensor, sigma: Tensor | float) -> Tensor:
    """Eq. C1: f_θ(x_σ, σ) = x_σ − σ·v_θ(x_σ, σ), eq. F3's x̂0.

    The boundary condition f(x, 0) = x holds exactly for any network (the σ·v term vanishes), so no c_skip/c_out
    are needed; the DDPM scalings c_skip(t)·x + c_out(t)·v would not give an x0 for a velocity output.
    """
    return x0_from_velocity(x_sigma, v, sigma)


def flow_training_grid(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, skip: int = 20, shift: float = 1.0,
                       mu: float | None = None, dtype: torch.dtype = torch.float64) -> Tensor:
    """The skipping-step grid on the shifted table, ascending: σ_n = S(n·k/T), n = 0 … N, N = T // k.

    S is eq. S1 with ``shift`` (SD3) or eq. S3 with ``mu`` (FLUX). σ_0 = 0, where the boundary condition holds.
    With ``shift``, σ_n for n ≥ 1 are entries of the scheduler's training table (:func:`train_sigmas`), so the
    teacher sees only timesteps σ·T it was trained on; with ``mu`` the training table stays unshifted (diffusers
    shifts FLUX's sigmas at inference only), so the grid's points are not its entries. σ_N = 1 when k divides T. A consistency pair is (σ_{n+1}, σ_n)
    (:func:`flow_consistency_pair`): k table steps apart, as t_{n+k}, t_n in the DDPM grid.
    """
    if skip < 1 or skip > num_train_timesteps:
        raise LcmkitError(f"skip k must be in [1, {num_train_timesteps}], got {skip}")
    u = torch.arange(0, num_train_timesteps // skip + 1, dtype=dtype) * skip / num_train_timesteps
    if mu is not None:
        return torch.cat([u.new_zeros(1), time_shift_exponential(u[1:], mu)])  # S3 divides by σ: σ_0 = 0 set
    return shift_sigmas(u, shift)


def flow_consistency_pair(grid: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """(σ_{n+1}, σ_n) for grid indices ``index`` ∈ [0, N): the noisier point the student sees and the one the
    teacher's solver reaches. index 0 maps σ_1 to σ_0 = 0, where the target is the solver output itself."""
    return grid[index + 1], grid[index]


def flow_lcm_step(x_sigma: Tensor, v: Tensor, sigma: Tensor | float, sigma_next: Tensor | float,
                  noise: Tensor) -> tuple[Tensor, Tensor]:
    """One multistep consistency sampling step (eq. C2; ``FlowMatchLCMScheduler.step``).

    x̂0 = x_σ − σ·v (eq. C1), then re-noise to the next level with fresh ε: x_σ' = (1 − σ')·x̂0 + σ'·ε (eq. F1).
    Returns (x_σ', x̂0); at σ' = 0 the first is x̂0 itself. ``noise`` is ε, drawn by the caller.
    """
    x0_hat = flow_consistency_function(x_sigma, v, sigma)
    return flow_noise(x0_hat, noise, sigma_next), x0_hat
