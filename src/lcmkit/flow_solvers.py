"""Teacher one-step solvers Ψ and samplers for rectified-flow teachers (SD3 / SD3.5, FLUX.1), in registries.

The flow counterpart of :mod:`lcmkit.solvers`. The contract is the **flow denoiser**:
``denoiser(x_sigma, sigma) -> (x0_hat, v_hat)`` with x_σ (B, C, H, W) and σ (B,) float in [0, 1]; the adapter
(:mod:`lcmkit.flow_denoisers`) passes the transformer t = σ·1000 and applies CFG on v inside, so a solver never
knows whether its model is guided. A step goes from σ (noisier) to σ' < σ; the math is :mod:`lcmkit.math.flow`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .math.flow import euler_flow_step, flow_lcm_step, heun_flow_step
from .solvers import Generators, randn

FlowDenoiser = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def as_sigma_batch(sigma: Tensor | float, x: Tensor) -> Tensor:
    """σ as a (B,) tensor in x's dtype (a float or 0-d tensor is repeated for the batch)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma


# ---------------------------------------------------------------------------------------------------------------
# Teacher one-step solvers Ψ(x_σ, σ → σ'), for consistency distillation's target ẑ_{σ_n}.
# ---------------------------------------------------------------------------------------------------------------

def euler_flow_solver(denoiser: FlowDenoiser, x_sigma: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """Eq. E1: x_σ' = x_σ + (σ' − σ)·v(x_σ, σ). Cost: 1 teacher evaluation."""
    sigma, sigma_next = as_sigma_batch(sigma, x_sigma), as_sigma_batch(sigma_next, x_sigma)
    _, v = denoiser(x_sigma, sigma)
    return euler_flow_step(x_sigma, v, sigma, sigma_next)


def heun_flow_solver(denoiser: FlowDenoiser, x_sigma: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """Eq. E2 (Heun): Euler predictor to σ', then the trapezoid (v + v')/2. Where σ' = 0 the Euler step is kept, as
    in ``FlowMatchHeunDiscreteScheduler`` (the teacher was never trained at σ = 0). Cost: 2 teacher evaluations
    (1 where every σ' of the batch is 0)."""
    sigma, sigma_next = as_sigma_batch(sigma, x_sigma), as_sigma_batch(sigma_next, x_sigma)
    _, v = denoiser(x_sigma, sigma)
    x_euler = euler_flow_step(x_sigma, v, sigma, sigma_next)
    final = sigma_next == 0
    if bool(final.all()):
        return x_euler
    _, v_next = denoiser(x_euler, sigma_next)
    x_heun = heun_flow_step(x_sigma, v, v_next, sigma, sigma_next)
    return torch.where(final.reshape(-1, *([1] * (x_sigma.ndim - 1))), x_euler, x_heun)


#: name → Ψ(denoiser, x_σ, σ, σ') -> x_σ'
FLOW_SOLVERS: dict[str, Callable[..., Tensor]] = {"euler": euler_flow_solver, "heun": heun_flow_solver}
#: teacher evaluations per Ψ step (each one batched conditional + unconditional forward under CFG)
FLOW_TEACHER_EVALUATIONS = {"euler": 1, "heun": 2}


# ---------------------------------------------------------------------------------------------------------------
# Samplers over a sigma table σ_0 > … > σ_{N−1} > σ_N = 0 (:func:`lcmkit.math.flow.flow_sigmas`).
# ---------------------------------------------------------------------------------------------------------------

def _check(sigmas: Tensor) -> Tensor:
    sigmas = torch.as_tensor(sigmas)
    if sigmas.ndim != 1 or len(sigmas) < 2 or float(sigmas[-1]) != 0.0:
        raise ValueError("a flow sampler needs sigmas σ_0 > … > σ_N = 0 (at least one step); see flow_sigmas")
    return sigmas


def sample_flow_euler(denoiser: FlowDenoiser, x: Tensor, sigmas: Tensor, generator: Generators = None,
                      callback: Callable[[int], None] | None = None) -> Tensor:
    """The teacher's Euler sampler (``FlowMatchEulerDiscreteScheduler``): eq. E1 over the table. N evaluations."""
    return _march(euler_flow_solver, denoiser, x, sigmas, callback)


def sample_flow_heun(denoiser: FlowDenoiser, x: Tensor, sigmas: Tensor, generator: Generators = None,
                     callback: Callable[[int], None] | None = None) -> Tensor:
    """The second-order teacher sampler (``FlowMatchHeunDiscreteScheduler``): eq. E2 on every interval, Euler on
    the last one (to σ = 0). 2N − 1 evaluations."""
    return _march(heun_flow_solver, denoiser, x, sigmas, callback)


def _march(solver, denoiser: FlowDenoiser, x: Tensor, sigmas: Tensor, callback) -> Tensor:
    """A deterministic sampler: the one-step ``solver`` over consecutive σ of the table."""
    sigmas = _check(sigmas)
    for i in range(len(sigmas) - 1):
        x = solver(denoiser, x, sigmas[i], sigmas[i + 1])
        if callback is not None:
            callback(i)
    return x


def sample_flow_lcm(denoiser: FlowDenoiser, x: Tensor, sigmas: Tensor, generator: Generators = None,
                    callback: Callable[[int], None] | None = None) -> Tensor:
    """Multistep consistency sampling (LCM paper Algorithm 3 on the flow; ``FlowMatchLCMScheduler.step``).

    For each σ_i: x̂0 = f_θ(x, σ_i) = x − σ_i·v (eq. C1); unless it is the last step, x ← (1 − σ_{i+1})·x̂0 +
    σ_{i+1}·ε with fresh ε from ``generator`` (one per image, drawn as diffusers' ``randn_tensor`` draws it). The
    last step returns x̂0 (diffusers draws ε there too and multiplies it by σ_N = 0: the same image).
    """
    sigmas = _check(sigmas)
    for i in range(len(sigmas) - 1):
        sigma = as_sigma_batch(sigmas[i], x)
        x0_hat, v = denoiser(x, sigma)
        if callback is not None:
            callback(i)
        if i == len(sigmas) - 2:
            return x0_hat
        noise = randn(x.shape, generator, x.device, x0_hat.dtype)  # the dtype diffusers' step draws in
        x, _ = flow_lcm_step(x, v, sigma, sigmas[i + 1], noise)


#: name → sample(denoiser, x_1, sigmas, generator) -> x0; "lcm" for a consistency model, the others the teacher's
FLOW_SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "lcm": sample_flow_lcm, "euler": sample_flow_euler, "heun": sample_flow_heun,
}


def get_flow_sampler(name: str) -> Callable[..., Tensor]:
    if name not in FLOW_SAMPLERS:
        raise ValueError(f"unknown flow sampler {name!r}; expected one of {', '.join(FLOW_SAMPLERS)}")
    return FLOW_SAMPLERS[name]
