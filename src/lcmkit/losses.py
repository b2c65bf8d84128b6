"""Consistency losses: latent consistency distillation (LCM paper, Algorithm 1; on DDPM teachers and on rectified
flows) and fine-tuning (Algorithm 4).

Each loss is one function. The caller passes the data latents, the noise and the grid indices, so a test can
feed fixed tensors and check the value by hand. Models come in as denoisers (``denoiser(x_t, t) -> (x̂0, ε̂)``,
:mod:`lcmkit.solvers`) with their conditioning already bound:

- ``teacher``: the frozen teacher under classifier-free guidance with per-sample ω (the augmented PF-ODE);
- ``student``: the online model θ (full LCM: w-embedding of ω bound in; LCM-LoRA: guidance baked in);
- ``target``: θ⁻, the EMA of θ (full LCM) or θ itself without gradients (LCM-LoRA).

The boundary-conditioned consistency function f = c_skip·z + c_out·x̂0 is applied here, from the same
:func:`lcmkit.math.consistency_function` the sampler uses, so training and sampling cannot drift apart. On a flow
(:func:`flow_lcd_loss`) the models are flow denoisers (``denoiser(x_σ, σ) -> (x̂0, v̂)``) and f = x_σ − σ·v
(:func:`lcmkit.math.flow.flow_consistency_function`, the one the flow LCM sampler's step uses).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .flow_solvers import FLOW_SOLVERS, FlowDenoiser
from .math.consistency import consistency_function
from .math.flow import flow_consistency_function, flow_consistency_pair, flow_noise
from .math.schedule import alpha_sigma, append_dims
from .math.timesteps import consistency_pair
from .solvers import Denoiser, get_solver

LOSS_TYPES = ("l2", "huber")


def consistency_distance(pred: Tensor, target: Tensor, loss_type: str = "huber", huber_c: float = 0.001) -> Tensor:
    """d(·,·) of the consistency loss, averaged over every element, computed in float32 or wider.

    ``l2``: mean squared error (LCM paper). ``huber``: pseudo-Huber √(Δ² + c²) − c (Song & Dhariwal 2023; the
    reference LCM scripts use c = 0.001), which behaves like L1 for |Δ| ≫ c and is smooth at 0.
    """
    dtype = torch.promote_types(pred.dtype, torch.float32)
    pred, target = pred.to(dtype), target.to(dtype)
    if loss_type == "l2":
        return F.mse_loss(pred, target)
    if loss_type == "huber":
        return (torch.sqrt((pred - target) ** 2 + huber_c**2) - huber_c).mean()
    raise ValueError(f"unknown loss type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")


def _noisy(z0: Tensor, noise: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """z_t = α_t·z0 + σ_t·ε (forward diffusion, per-sample t)."""
    alpha, sigma = (append_dims(v, z0.ndim).to(device=z0.device, dtype=z0.dtype) for v in alpha_sigma(alphas_cumprod, t))
    return alpha * z0 + sigma * noise


def lcd_loss(student: Denoiser, target: Denoiser, teacher: Denoiser, z0: Tensor, noise: Tensor, index: Tensor,
             alphas_cumprod: Tensor, *, skip: int = 20, solver: str = "ddim", loss_type: str = "huber",
             huber_c: float = 0.001) -> tuple[Tensor, dict[str, Tensor]]:
    """Latent consistency distillation loss (LCM paper, Algorithm 1, with CFG and skipping step k).

    Args:
        z0: data latents E(x)·scaling_factor, (B, C, H, W).
        noise: ε ~ N(0, I), same shape.
        index: n ∈ [0, N), N = T // k, one per sample (B,): the pair (t_{n+k}, t_n) of the skipping-step grid.
        skip: k. solver: teacher one-step solver Ψ (``ddim``, ``dpm-solver``, ``dpm-solver++``).
    Returns ``(loss, terms)``; ``terms`` holds the pair's timesteps and the tensors of each step, detached.
    """
    # 1. the consistency pair on the skipping-step grid: t_{n+k} = (n+1)k − 1, t_n = max(t_{n+k} − k, 0)
    t_n_plus_k, t_n = consistency_pair(index.to(z0.device), skip)
    # 2. z_{t_{n+k}} ~ q(z_{t_{n+k}} | z0)
    z_n_plus_k = _noisy(z0, noise, t_n_plus_k, alphas_cumprod)
    with torch.no_grad():
        # 3. one solver step of the guided teacher (augmented PF-ODE): ẑ_{t_n} = Ψ_ω(z_{t_{n+k}}, t_{n+k} → t_n)
        z_n_hat = get_solver(solver)(teacher, z_n_plus_k, t_n_plus_k, t_n, alphas_cumprod)
        # 4. target f_θ⁻(ẑ_{t_n}, ω, c, t_n); at t_n = 0 the boundary condition makes it ẑ_{t_n} itself
        x0_target, _ = target(z_n_hat, t_n)
        f_target = consistency_function(z_n_hat, x0_target, t_n)
    # 5. online prediction f_θ(z_{t_{n+k}}, ω, c, t_{n+k})
    x0_student, _ = student(z_n_plus_k, t_n_plus_k)
    f_student = consistency_function(z_n_plus_k, x0_student, t_n_plus_k)
    # 6. d(f_θ, f_θ⁻)
    loss = consistency_distance(f_student, f_target, loss_type, huber_c)
    terms = {"t_n_plus_k": t_n_plus_k, "t_n": t_n, "z_n_plus_k": z_n_plus_k.detach(), "z_n_hat": z_n_hat,
             "f_student": f_student.detach(), "f_target": f_target}
    return loss, terms


def flow_lcd_loss(student: FlowDenoiser, target: FlowDenoiser, teacher: FlowDenoiser, z0: Tensor, noise: Tensor,
                  index: Tensor, grid: Tensor, *, solver: str = "euler", loss_type: str = "huber",
                  huber_c: float = 0.001) -> tuple[Tensor, dict[str, Tensor]]:
    """Latent consistency distillation on a rectified flow (Algorithm 1 with x_σ = (1 − σ)·z0 + σ·ε; the
    derivation is docs/flow-matching.md, "The flow LCD loss"). Models are flow denoisers
    (``denoiser(x_σ, σ) -> (x̂0, v̂)``, :mod:`lcmkit.flow_solvers`); the teacher's CFG on v is bound in.

    Args:
        z0: data latents (VAE mean − shift)·scaling_factor, (B, C, H, W). noise: ε ~ N(0, I), same shape.
        index: n ∈ [0, N) per sample (B,): the pair (σ_{n+1}, σ_n) of ``grid``.
        grid: σ_0 = 0 < σ_1 < … < σ_N, the skipping-step grid on the shifted table
            (:func:`lcmkit.math.flow.flow_training_grid`); consecutive points are k table steps apart.
        solver: teacher one-step solver Ψ (``euler``, ``heun``).
    Returns ``(loss, terms)``; ``terms`` holds the pair's sigmas and the tensors of each step, detached.
    """
    # 1. the consistency pair: σ_{n+k} = grid[n + 1] (noisier, the student's) and σ_n = grid[n] (the teacher's)
    sigma_n_plus_k, sigma_n = flow_consistency_pair(grid.to(z0.device), index.to(z0.device))
    # 2. x_{σ_{n+k}} = (1 − σ_{n+k})·z0 + σ_{n+k}·ε (eq. F1)
    x_n_plus_k = flow_noise(z0, noise, sigma_n_plus_k)
    with torch.no_grad():
        # 3. one solver step of the guided teacher on dx/dσ = v: x̂_{σ_n} = Ψ_ω(x_{σ_{n+k}}, σ_{n+k} → σ_n)
        x_n_hat = FLOW_SOLVERS[solver](teacher, x_n_plus_k, sigma_n_plus_k, sigma_n)
        # 4. target f_θ⁻(x̂_{σ_n}, σ_n) = x̂_{σ_n} − σ_n·v_θ⁻ (eq. C1); where σ_n = 0 (n = 0) x̂_{σ_n} itself, taken
        #    as is: 0·v would turn a non-finite v at σ = 0, where the model was never trained, into NaN
        _, v_target = target(x_n_hat, sigma_n)
        at_zero = (sigma_n == 0).reshape(-1, *([1] * (z0.ndim - 1)))
        f_target = torch.where(at_zero, x_n_hat, flow_consistency_function(x_n_hat, v_target, sigma_n))
    # 5. online prediction f_θ(x_{σ_{n+k}}, σ_{n+k}) = x_{σ_{n+k}} − σ_{n+k}·v_θ
    _, v_student = student(x_n_plus_k, sigma_n_plus_k)
    f_student = flow_consistency_function(x_n_plus_k, v_student, sigma_n_plus_k)
    # 6. d(f_θ, f_θ⁻)
    loss = consistency_distance(f_student, f_target, loss_type, huber_c)
    terms = {"sigma_n_plus_k": sigma_n_plus_k, "sigma_n": sigma_n, "x_n_plus_k": x_n_plus_k.detach(),
             "x_n_hat": x_n_hat, "f_student": f_student.detach(), "f_target": f_target}
    return loss, terms


def lcf_loss(student: Denoiser, target: Denoiser, z0: Tensor, noise: Tensor, index: Tensor, alphas_cumprod: Tensor,
             *, skip: int = 20, loss_type: str = "huber", huber_c: float = 0.001) -> tuple[Tensor, dict[str, Tensor]]:
    """Latent consistency fine-tuning loss (LCM paper, Algorithm 4): no teacher.

    Both points of the pair come from the same data latent and the same noise:
    z_{t_{n+k}} = α_{t_{n+k}}·z0 + σ_{t_{n+k}}·ε and z_{t_n} = α_{t_n}·z0 + σ_{t_n}·ε, then the same
    consistency loss d(f_θ(z_{t_{n+k}}, t_{n+k}), f_θ⁻(z_{t_n}, t_n)) against the EMA target.
    """
    # steps parallel to lcd_loss on purpose: Algorithm 4 is Algorithm 1 with the data standing in for the teacher
    # 1. the pair on the skipping-step grid
    t_n_plus_k, t_n = consistency_pair(index.to(z0.device), skip)
    # 2. both noisy latents from the same z0 and ε (the data itself stands in for the teacher's ODE step)
    z_n_plus_k = _noisy(z0, noise, t_n_plus_k, alphas_cumprod)
    z_n = _noisy(z0, noise, t_n, alphas_cumprod)
    with torch.no_grad():
        # 3. target f_θ⁻(z_{t_n}, t_n)
        x0_target, _ = target(z_n, t_n)
        f_target = consistency_function(z_n, x0_target, t_n)
    # 4. online prediction f_θ(z_{t_{n+k}}, t_{n+k}), 5. distance
    x0_student, _ = student(z_n_plus_k, t_n_plus_k)
    f_student = consistency_function(z_n_plus_k, x0_student, t_n_plus_k)
    loss = consistency_distance(f_student, f_target, loss_type, huber_c)
    terms = {"t_n_plus_k": t_n_plus_k, "t_n": t_n, "z_n_plus_k": z_n_plus_k.detach(), "z_n": z_n,
             "f_student": f_student.detach(), "f_target": f_target}
    return loss, terms
