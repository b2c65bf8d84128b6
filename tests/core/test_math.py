"""lcmkit.math against diffusers' schedulers and the paper's definitions, in float64."""

import pytest
import torch
from diffusers import DDPMScheduler, LCMScheduler, TCDScheduler

from lcmkit.errors import LcmkitError
from lcmkit.math import (
    alpha_sigma,
    alphas_cumprod_from_config,
    boundary_scalings,
    cfg,
    consistency_function,
    consistency_pair,
    guidance_embedding,
    lcm_timesteps,
    log_snr,
    timestep_from_log_snr,
    to_x0_eps,
    training_grid,
)
from lcmkit.math.param import from_x0_eps

torch.manual_seed(0)


@pytest.mark.parametrize("schedule", ["scaled_linear", "linear"])
def test_alphas_cumprod_matches_diffusers(schedule):
    ref = DDPMScheduler(beta_schedule=schedule, beta_start=0.00085, beta_end=0.012).alphas_cumprod.double()
    ours = alphas_cumprod_from_config({"beta_schedule": schedule, "beta_start": 0.00085, "beta_end": 0.012})
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)  # diffusers builds β in float32


@pytest.mark.parametrize("steps", range(1, 9))
@pytest.mark.parametrize("original", [50, 100])
@pytest.mark.parametrize("strength", [1.0, 0.8, 0.5, 0.3])
def test_lcm_timesteps_match_diffusers(steps, original, strength):
    sched = LCMScheduler()
    try:
        sched.set_timesteps(steps, original_inference_steps=original, strength=strength)
    except ValueError:
        with pytest.raises(LcmkitError):
            lcm_timesteps(steps, original_inference_steps=original, strength=strength)
        return
    assert lcm_timesteps(steps, original_inference_steps=original, strength=strength) == sched.timesteps.tolist()


def test_lcm_timesteps_reference_values():
    assert lcm_timesteps(4) == [999, 759, 499, 259]
    assert lcm_timesteps(8) == [999, 879, 759, 639, 499, 379, 259, 139]
    assert lcm_timesteps(4, original_inference_steps=100) == [999, 749, 499, 249]
    assert lcm_timesteps(4, strength=0.8) == [799, 599, 399, 199]
    assert lcm_timesteps(4, strength=0.5) == [499, 379, 259, 139]
    for bad in [dict(num_inference_steps=0), dict(num_inference_steps=51), dict(num_inference_steps=4, strength=0.05),
                dict(num_inference_steps=4, strength=0.0), dict(num_inference_steps=4, strength=1.5)]:
        with pytest.raises(LcmkitError):
            lcm_timesteps(**bad)


def test_tcd_default_grid_equals_lcm_grid():
    sched = TCDScheduler()
    for n in (1, 2, 4, 8):
        sched.set_timesteps(n)
        assert sched.timesteps.tolist() == lcm_timesteps(n)


def test_training_grid_and_pairs():
    grid = training_grid(1000, 20)
    assert grid[0] == 19 and grid[-1] == 999 and len(grid) == 50
    t_nk, t_n = consistency_pair(torch.arange(50), 20)
    assert torch.equal(t_nk, grid) and t_n[0] == 0 and torch.equal(t_n[1:], grid[:-1])
    assert torch.equal(training_grid(1000, 1), torch.arange(1000))


def test_boundary_scalings_match_lcm_scheduler():
    sched = LCMScheduler()
    for t in [0, 1, 19, 259, 999]:
        c_skip, c_out = boundary_scalings(t)
        ref_skip, ref_out = sched.get_scalings_for_boundary_condition_discrete(t)
        assert float(c_skip) == pytest.approx(ref_skip, rel=1e-12) and float(c_out) == pytest.approx(ref_out, rel=1e-12)
    c_skip, c_out = boundary_scalings(torch.arange(19, 1000))
    assert (c_skip < 7e-4).all() and (c_out > 0.9993).all()  # ≈ 0 and ≈ 1 from t = 19 on


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_boundary_scalings_and_consistency_function_in_low_precision(dtype):
    t = torch.tensor([0, 1, 19, 259, 999])
    ref_skip, ref_out = boundary_scalings(t)
    c_skip, c_out = boundary_scalings(t, dtype=dtype)  # (10·999)² overflows float16: must not give 0/0 scalings
    assert c_skip.dtype == dtype and c_out.dtype == dtype
    tol = dict(rtol=torch.finfo(dtype).eps, atol=0)  # float32 stays computed in float32 (diffusers' values)
    torch.testing.assert_close(c_skip, ref_skip.to(dtype), **tol)
    torch.testing.assert_close(c_out, ref_out.to(dtype), **tol)
    x, x0 = torch.randn(5, 4, 2, 2).to(dtype), torch.randn(5, 4, 2, 2).to(dtype)
    out = consistency_function(x, x0, t)
    assert torch.isfinite(out).all() and torch.equal(out[0], x[0])
    torch.testing.assert_close(out[-1], x0[-1], rtol=0, atol=0.01)


def test_consistency_function_is_identity_at_zero():
    x, x0 = torch.randn(3, 4, 8, 8, dtype=torch.float64), torch.randn(3, 4, 8, 8, dtype=torch.float64)
    assert torch.equal(consistency_function(x, x0, 0), x)  # exactly: c_skip = 1, c_out = 0
    out = consistency_function(x, x0, torch.tensor([0, 19, 999]))
    assert torch.equal(out[0], x[0]) and not torch.allclose(out[1], x[1])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_parameterisation_round_trip(prediction_type):
    ac = alphas_cumprod_from_config({})
    t = torch.tensor([0, 10, 500, 999])
    alpha, sigma = (v.reshape(-1, 1, 1, 1) for v in alpha_sigma(ac, t))
    x0, eps = torch.randn(4, 4, 8, 8, dtype=torch.float64), torch.randn(4, 4, 8, 8, dtype=torch.float64)
    x_t = alpha * x0 + sigma * eps
    out = from_x0_eps(x0, eps, alpha, sigma, prediction_type)
    x0_hat, eps_hat = to_x0_eps(out, x_t, alpha, sigma, prediction_type)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-9 if prediction_type != "sample" else 0)
    torch.testing.assert_close(eps_hat, eps, rtol=0, atol=1e-7)  # sample→eps divides by σ_0 ≈ 0.03


def test_log_snr_inverse():
    ac = alphas_cumprod_from_config({})
    t = torch.arange(1000)
    assert torch.equal(timestep_from_log_snr(ac, log_snr(ac, t)), t)
    tf = torch.tensor([0.25, 17.5, 600.9], dtype=torch.float64)
    torch.testing.assert_close(timestep_from_log_snr(ac, log_snr(ac, tf), discrete=False), tf)
    alpha, sigma = alpha_sigma(ac, tf)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(3, dtype=torch.float64))


def test_guidance_embedding_matches_diffusers_pipeline():
    from diffusers import LatentConsistencyModelPipeline
    w = torch.tensor([0.0, 1.5, 6.5, 14.0])
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=256)
    ours = guidance_embedding(w, 256)
    assert ours.shape == (4, 256)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)  # same float32 arithmetic as diffusers
    ours64 = guidance_embedding(w, 256, dtype=torch.float64, compute_dtype=torch.float64)
    assert (ours64 - ref.double()).abs().max() < 2e-3  # float32 rounding of 1000ω·f is the only difference
    assert ours64[0, :128].abs().max() == 0 and (ours64[0, 128:] == 1).all()  # ω = 0: sin 0, cos 0


def test_cfg_paper_form():
    c, u = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    assert torch.equal(cfg(c, u, 0.0), c)
    torch.testing.assert_close(cfg(c, u, 6.5), 7.5 * c - 6.5 * u)  # diffusers: u + 7.5·(c − u)
