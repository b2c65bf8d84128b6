"""Teacher solvers Ψ and few-step samplers against diffusers' schedulers (float64) and a toy ODE."""

import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverSinglestepScheduler,
    LCMScheduler,
    TCDScheduler,
)

from lcmkit.math import (
    alpha_sigma,
    alphas_cumprod_from_config,
    append_dims,
    lcm_timesteps,
    to_x0_eps,
)
from lcmkit.solvers import (
    SOLVERS,
    TEACHER_EVALUATIONS,
    _midpoint,
    ddim_step,
    dpm_solver_2_step,
    dpm_solver_pp_2s_step,
    sample_lcm,
    sample_tcd,
)

D = torch.float64
SHAPE = (2, 4, 8, 8)


def make_model(seed=0):
    """A fixed smooth nonlinear 'network' output(x, t), the same function for diffusers and lcmkit."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 4, generator=g, dtype=D) / 2
    b = torch.randn(4, generator=g, dtype=D)

    def model(x, t):
        t = torch.as_tensor(t, dtype=D).reshape(-1)
        t = t.expand(x.shape[0]) if t.numel() == 1 else t
        h = torch.einsum("oc,bchw->bohw", w, x) + b[None, :, None, None] * (t[:, None, None, None] / 1000.0)
        return torch.tanh(h) + 0.1 * x
    return model


def as_denoiser(model, ac, prediction_type):
    def denoiser(x, t):
        alpha, sigma = (append_dims(v, x.ndim) for v in alpha_sigma(ac, t))
        return to_x0_eps(model(x, t), x, alpha, sigma, prediction_type)
    return denoiser


def diffusers_table(sched):
    sched.alphas_cumprod = sched.alphas_cumprod.to(D)
    sched.final_alpha_cumprod = torch.as_tensor(sched.final_alpha_cumprod, dtype=D)
    return sched.alphas_cumprod


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_sampler_equals_lcm_scheduler(prediction_type, steps):
    sched = LCMScheduler(prediction_type=prediction_type)
    ac = diffusers_table(sched)
    model = make_model()
    x_T = torch.randn(SHAPE, dtype=D, generator=torch.Generator().manual_seed(1))

    sched.set_timesteps(steps)
    x, g = x_T.clone(), torch.Generator().manual_seed(7)
    for t in sched.timesteps:  # a Python int timestep keeps diffusers' c_skip/c_out in float64
        x, denoised = sched.step(model(x, int(t)), int(t), x, generator=g, return_dict=False)
    ours = sample_lcm(as_denoiser(model, ac, prediction_type), x_T.clone(), lcm_timesteps(steps), ac,
                      torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours, denoised, rtol=0, atol=1e-12)


def test_lcm_last_step_adds_no_noise():
    ac = alphas_cumprod_from_config({})
    den = as_denoiser(make_model(), ac, "epsilon")
    x = torch.randn(SHAPE, dtype=D)
    a = sample_lcm(den, x, [999, 499], ac, torch.Generator().manual_seed(0))
    b = sample_lcm(den, x, [999, 499], ac, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    one = sample_lcm(den, x, [999], ac, torch.Generator().manual_seed(1))
    assert torch.equal(one, sample_lcm(den, x, [999], ac, torch.Generator().manual_seed(2)))  # no noise drawn


def test_lcm_sampler_in_half_precision_follows_float64(dtype=torch.float16):
    # c_skip/c_out at t = 999 involve (10·t)² ≈ 1e8, past float16's range: computed in x's dtype they became
    # inf → c_skip = c_out = 0 and every fp16 image was the decoded zero latent, whatever the model or LoRA
    ac = alphas_cumprod_from_config({})
    model = as_denoiser(make_model(), ac, "epsilon")
    den = lambda x, t: model(x.to(D), t)  # noqa: E731  (as unet_denoiser: a half x, outputs promoted)
    x = torch.randn(SHAPE, dtype=D, generator=torch.Generator().manual_seed(3))
    ref = sample_lcm(den, x, [999, 499], ac, torch.Generator().manual_seed(0))
    half = sample_lcm(den, x.to(dtype), [999, 499], ac, torch.Generator().manual_seed(0))
    assert half.abs().max() > 0.5
    torch.testing.assert_close(half.to(D), ref, rtol=0, atol=0.05)


def test_per_sample_generators_make_images_independent():
    ac = alphas_cumprod_from_config({})
    den = as_denoiser(make_model(), ac, "epsilon")
    x = torch.randn(3, 4, 8, 8, dtype=D)
    gens = [torch.Generator().manual_seed(10 + i) for i in range(3)]
    batch = sample_lcm(den, x, [999, 499, 259], ac, gens)
    alone = sample_lcm(den, x[1:2], [999, 499, 259], ac, [torch.Generator().manual_seed(11)])
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=1e-12)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_tcd_sampler_equals_tcd_scheduler(prediction_type, eta, steps):
    sched = TCDScheduler(prediction_type=prediction_type)
    ac = diffusers_table(sched)
    model = make_model(3)
    x_T = torch.randn(SHAPE, dtype=D, generator=torch.Generator().manual_seed(2))
    sched.set_timesteps(steps)
    x, g = x_T.clone(), torch.Generator().manual_seed(5)
    for t in sched.timesteps:
        x = sched.step(model(x, int(t)), t, x, eta=eta, generator=g, return_dict=False)[0]
    ours = sample_tcd(as_denoiser(model, ac, prediction_type), x_T.clone(), sched.timesteps.tolist(), ac,
                      torch.Generator().manual_seed(5), gamma=eta)
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("t,s", [(519, 499), (999, 979), (259, 239), (139, 39)])
def test_ddim_psi_equals_ddim_scheduler(prediction_type, t, s):
    sched = DDIMScheduler(prediction_type=prediction_type, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, clip_sample=False, set_alpha_to_one=False)
    ac = diffusers_table(sched)
    sched.set_timesteps(1000 // (t - s))
    model = make_model(1)
    x = torch.randn(SHAPE, dtype=D)
    ref = sched.step(model(x, t), t, x, eta=0.0).prev_sample
    ours = ddim_step(as_denoiser(model, ac, prediction_type), x, torch.tensor(t), torch.tensor(s), ac)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("algorithm,ours_fn", [("dpmsolver", dpm_solver_2_step), ("dpmsolver++", dpm_solver_pp_2s_step)])
@pytest.mark.parametrize("t,s", [(999, 979), (519, 499), (39, 19), (19, 0), (120, 119), (999, 0)])
def test_second_order_psi_equals_diffusers_singlestep(algorithm, ours_fn, t, s):
    """diffusers' single-step 2nd-order update driven through the same three points (t, s1, s)."""
    ac = alphas_cumprod_from_config({})
    tt, ss = torch.tensor([t]), torch.tensor([s])
    s1 = _midpoint(ac, tt, ss)
    model = make_model(2)
    den = as_denoiser(model, ac, "epsilon")
    x = torch.randn(1, 4, 8, 8, dtype=D)
    sched = DPMSolverSinglestepScheduler(algorithm_type=algorithm, solver_order=2, solver_type="midpoint",
                                         lower_order_final=False, final_sigmas_type="sigma_min")
    ratio = lambda time: (sigma_over_alpha := alpha_sigma(ac, time))[1] / sigma_over_alpha[0]  # noqa: E731
    sched.sigmas = torch.cat([ratio(tt.double()), ratio(s1), ratio(ss.double())]).to(D)
    pick = 0 if algorithm == "dpmsolver++" else 1
    # first order from t to s1 (the intermediate u), then the second-order update from t to s
    m_t = den(x, tt)[pick]
    sched._step_index = 0
    u = sched.dpm_solver_first_order_update(m_t, sample=x)
    m_1 = den(u, s1)[pick]
    sched._step_index = 1
    ref = sched.singlestep_dpm_solver_second_order_update([m_t, m_1], sample=x)
    torch.testing.assert_close(ours_fn(den, x, tt, ss, ac), ref, rtol=1e-10, atol=1e-10)


def test_registry_and_costs():
    assert set(SOLVERS) == {"ddim", "dpm-solver", "dpm-solver++"}
    assert TEACHER_EVALUATIONS == {"ddim": 1, "dpm-solver": 2, "dpm-solver++": 2}
    calls = []
    ac = alphas_cumprod_from_config({})
    base = as_denoiser(make_model(), ac, "epsilon")

    def counting(x, t):
        calls.append(1)
        return base(x, t)
    for name, fn in SOLVERS.items():
        calls.clear()
        fn(counting, torch.randn(SHAPE, dtype=D), torch.tensor(519), torch.tensor(499), ac)
        assert len(calls) == TEACHER_EVALUATIONS[name]


def gaussian_ode(ac, mu=0.7, s=0.4):
    """Data N(μ, s²): the exact denoiser and the exact PF-ODE flow map between two times."""
    def denoiser(x, t):
        alpha, sigma = (append_dims(v, x.ndim) for v in alpha_sigma(ac, t))
        x0 = mu + alpha * s**2 / (alpha**2 * s**2 + sigma**2) * (x - alpha * mu)
        return x0, (x - alpha * x0) / sigma

    def flow(x, t, s_):
        a_t, sg_t = alpha_sigma(ac, t)
        a_s, sg_s = alpha_sigma(ac, s_)
        return a_s * mu + torch.sqrt(a_s**2 * s**2 + sg_s**2) / torch.sqrt(a_t**2 * s**2 + sg_t**2) * (x - a_t * mu)
    return denoiser, flow


@pytest.mark.parametrize("name,order", [("ddim", 1), ("dpm-solver", 2), ("dpm-solver++", 2)])
def test_convergence_order_on_gaussian_ode(name, order):
    """Integrate the PF-ODE of a Gaussian from t=800 to t=50 with N steps; error ~ N^-order."""
    ac = alphas_cumprod_from_config({})
    denoiser, flow = gaussian_ode(ac)
    x = torch.linspace(-2, 2, 16, dtype=D).reshape(1, 1, 4, 4)
    exact = flow(x, torch.tensor(800.0, dtype=D), torch.tensor(50.0, dtype=D))
    errors = []
    for n in (8, 16, 32):
        # uniform in λ, float times: the order shows without grid rounding
        from lcmkit.math import log_snr, timestep_from_log_snr
        lam = torch.linspace(float(log_snr(ac, torch.tensor(800.0, dtype=D))),
                             float(log_snr(ac, torch.tensor(50.0, dtype=D))), n + 1, dtype=D)
        ts = timestep_from_log_snr(ac, lam, discrete=False)
        z = x.clone()
        for i in range(n):
            z = SOLVERS[name](denoiser, z, ts[i:i + 1], ts[i + 1:i + 2], ac)
        errors.append(float((z - exact).abs().max()))
    rates = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(abs(r - order) < 0.35 for r in rates), (errors, rates)
