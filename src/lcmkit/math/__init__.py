"""The LCM math as pure functions: tensors in, tensors out, float64-capable, no state.

Glossary (paper → diffusers):
  ᾱ_t → ``alphas_cumprod[t]``; α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t); λ_t = log(α_t/σ_t) (half log-SNR);
  ω (paper CFG scale, (1+ω)·ε_c − ω·ε_∅) → ``guidance_scale − 1``;
  k (skipping step) → ``num_train_timesteps // num_ddim_timesteps``;
  f_θ = c_skip·z + c_out·x̂0 → ``LCMScheduler`` ``denoised``.
"""

from .consistency import boundary_scalings, consistency_function
from .guidance import cfg, guidance_embedding
from .param import eps_from_x0, to_x0_eps, v_from_x0_eps, x0_from_eps
from .schedule import (
    alpha_sigma,
    alphas_cumprod_from_betas,
    alphas_cumprod_from_config,
    append_dims,
    linear_betas,
    log_snr,
    scaled_linear_betas,
    timestep_from_log_snr,
)
from .timesteps import consistency_pair, lcm_timesteps, training_grid

__all__ = [
    "alpha_sigma", "alphas_cumprod_from_betas", "alphas_cumprod_from_config", "append_dims", "boundary_scalings",
    "cfg", "consistency_function", "consistency_pair", "eps_from_x0", "guidance_embedding", "lcm_timesteps",
    "linear_betas", "log_snr", "scaled_linear_betas", "timestep_from_log_snr", "to_x0_eps", "training_grid",
    "v_from_x0_eps", "x0_from_eps",
]
