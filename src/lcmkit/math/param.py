"""Conversions between the three parameterisations of a diffusion model's output.

With x_t = α_t·x0 + σ_t·ε (α² + σ² = 1) and v = α_t·ε − σ_t·x0 (Salimans & Ho 2022):
  eps:    x0 = (x_t − σ_t·ε) / α_t
  v:      x0 = α_t·x_t − σ_t·v,   ε = σ_t·x_t + α_t·v
  sample: x0 is the output;        ε = (x_t − α_t·x0) / σ_t
α_t, σ_t must broadcast against x_t (see :func:`lcmkit.math.schedule.append_dims`).
"""

from __future__ import annotations

from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def x0_from_eps(x_t: Tensor, eps: Tensor, alpha_t: Tensor, sigma_t: Tensor) -> Tensor:
    return (x_t - sigma_t * eps) / alpha_t


def eps_from_x0(x_t: Tensor, x0: Tensor, alpha_t: Tensor, sigma_t: Tensor) -> Tensor:
    return (x_t - alpha_t * x0) / sigma_t


def v_from_x0_eps(x0: Tensor, eps: Tensor, alpha_t: Tensor, sigma_t: Tensor) -> Tensor:
    return alpha_t * eps - sigma_t * x0


def to_x0_eps(model_output: Tensor, x_t: Tensor, alpha_t: Tensor, sigma_t: Tensor,
              prediction_type: str) -> tuple[Tensor, Tensor]:
    """(x̂0, ε̂) from a model output of the given ``prediction_type`` (diffusers' names)."""
    if prediction_type == "epsilon":
        return x0_from_eps(x_t, model_output, alpha_t, sigma_t), model_output
    if prediction_type == "v_prediction":
        return alpha_t * x_t - sigma_t * model_output, sigma_t * x_t + alpha_t * model_output
    if prediction_type == "sample":
        return model_output, eps_from_x0(x_t, model_output, alpha_t, sigma_t)
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")


def from_x0_eps(x0: Tensor, eps: Tensor, alpha_t: Tensor, sigma_t: Tensor, prediction_type: str) -> Tensor:
    """The training target of a model of ``prediction_type`` given the clean sample and the noise."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return v_from_x0_eps(x0, eps, alpha_t, sigma_t)
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")
