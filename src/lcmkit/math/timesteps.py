"""Timestep grids: the skipping-step training grid (LCM paper §4.3) and LCM inference timestep selection."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..errors import LcmkitError


def training_grid(num_train_timesteps: int = 1000, skip: int = 20) -> Tensor:
    """t ∈ {k−1, 2k−1, …, T−1}: the N = T // k points a consistency pair (t_{n+k}) is drawn from."""
    if skip < 1 or skip > num_train_timesteps:
        raise LcmkitError(f"skip k must be in [1, {num_train_timesteps}], got {skip}")
    return torch.arange(1, num_train_timesteps // skip + 1) * skip - 1


def consistency_pair(index: Tensor, skip: int = 20) -> tuple[Tensor, Tensor]:
    """(t_{n+k}, t_n) for grid indices ``index`` ∈ [0, N): t_{n+k} = (n+1)·k − 1, t_n = max(t_{n+k} − k, 0).

    The smallest pair maps k−1 → 0, where the boundary condition makes the target the solver output itself.
    """
    t_n_plus_k = (index + 1) * skip - 1
    return t_n_plus_k, (t_n_plus_k - skip).clamp(min=0)


def lcm_timesteps(num_inference_steps: int, num_train_timesteps: int = 1000, original_inference_steps: int = 50,
                  strength: float = 1.0) -> list[int]:
    """The LCM inference timesteps (diffusers ≥ 0.24 ``LCMScheduler.set_timesteps``; LCM paper Algorithm 3).

    The distillation grid has ``int(original_inference_steps·strength)`` points k−1, 2k−1, … with
    k = T // original_inference_steps; taken from the top, the chosen indices are
    floor(linspace(0, len, N, endpoint=False)). 4 steps → [999, 759, 499, 259]. For img2img, ``strength`` < 1
    first shrinks the grid (LCM convention; diffusers' other img2img pipelines truncate the full schedule
    instead, diffusers issue 7651): 4 steps at 0.8 → [799, 599, 399, 199].
    """
    if not isinstance(num_inference_steps, (int, np.integer)) or num_inference_steps < 1:
        raise LcmkitError(f"steps must be a positive integer, got {num_inference_steps}")
    if not 0.0 < strength <= 1.0:
        raise LcmkitError(f"strength must be in (0, 1], got {strength}")
    if original_inference_steps < 1 or original_inference_steps > num_train_timesteps:
        raise LcmkitError(f"original_inference_steps must be in [1, {num_train_timesteps}], "
                          f"got {original_inference_steps}")
    k = num_train_timesteps // original_inference_steps
    n_grid = int(original_inference_steps * strength)
    if num_inference_steps > original_inference_steps:
        raise LcmkitError(f"{num_inference_steps} steps exceed the {original_inference_steps}-point distillation grid; "
                          f"use at most {original_inference_steps} steps")
    if n_grid < num_inference_steps:
        raise LcmkitError(f"strength {strength} leaves {n_grid} grid points, fewer than {num_inference_steps} steps; "
                          f"raise strength to at least {num_inference_steps / original_inference_steps:g} "
                          f"or use fewer steps")
    grid = (np.arange(1, n_grid + 1) * k - 1)[::-1]
    idx = np.floor(np.linspace(0, n_grid, num=num_inference_steps, endpoint=False)).astype(np.int64)
    return [int(t) for t in grid[idx]]
