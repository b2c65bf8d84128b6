"""lcmkit.math.flow and lcmkit.flow_solvers against diffusers' flow-matching schedulers, in float64.

diffusers keeps its sigma tables in float32 and casts the sample to float32 inside ``step``, so: tables agree to
float32 rounding; one step, fed the same (float32-representable) sample and float64 sigmas, agrees to 1e-12; whole
sampling loops agree to float32 rounding of the sample between steps.
"""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler, FlowMatchLCMScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from lcmkit.errors import LcmkitError
from lcmkit.flow_solvers import (
    FLOW_SAMPLERS,
    FLOW_SOLVERS,
    FLOW_TEACHER_EVALUATIONS,
    sample_flow_euler,
    sample_flow_heun,
    sample_flow_lcm,
)
from lcmkit.math import cfg
from lcmkit.math.flow import (
    SD3_SHIFT,
    dynamic_shift_mu,
    eps_from_velocity,
    euler_flow_step,
    flow_consistency_function,
    flow_consistency_pair,
    flow_lcm_step,
    flow_noise,
    flow_sigmas,
    flow_training_grid,
    flux_sigmas,
    shift_sigmas,
    time_shift_exponential,
    timestep_from_sigma,
    train_sigmas,
    velocity_from_x0,
    velocity_target,
    x0_from_velocity,
)

D = torch.float64
SHAPE = (2, 4, 8, 8)
F32 = dict(rtol=0, atol=2e-7)  # one float32 rounding of a value in [0, 1]
T32 = dict(rtol=3e-7, atol=1e-6)  # timesteps σ·1000: float32 rounding of σ and of the product


def make_velocity_model(seed=0):
    """A fixed smooth nonlinear 'transformer' v(x, t), the same function for diffusers and lcmkit (t = σ·1000)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 4, generator=g, dtype=D) / 2
    b = torch.randn(4, generator=g, dtype=D)

    def model(x, t):
        t = torch.as_tensor(t, dtype=D).reshape(-1)
        t = t.expand(x.shape[0]) if t.numel() == 1 else t
        h = torch.einsum("oc,bchw->bohw", w, x) + b[None, :, None, None] * (t[:, None, None, None] / 1000.0)
        return torch.tanh(h) - 0.3 * x
    return model


def as_flow_denoiser(model):
    def denoiser(x, sigma):
        v = model(x, timestep_from_sigma(sigma))
        return x0_from_velocity(x, v, sigma), v
    return denoiser


def float64_sigmas(sched):
    sched.sigmas = sched.sigmas.to(D)  # diffusers' own arithmetic, with its (float32-valued) sigmas in float64
    return sched.sigmas


# ---------------------------------------------------------------------------------------------------------------
# Sigma tables
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shift", [1.0, SD3_SHIFT])
def test_train_sigmas_match_scheduler_table(shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    ours = train_sigmas(shift=shift)
    assert ours.dtype == D and len(ours) == 1000 and ours[0] == 1.0
    torch.testing.assert_close(ours, sched.sigmas.double(), **F32)
    torch.testing.assert_close(timestep_from_sigma(ours), sched.timesteps.double(), **T32)
    # dynamic shifting leaves the training table unshifted
    torch.testing.assert_close(train_sigmas(), FlowMatchEulerDiscreteScheduler(
        shift=shift, use_dynamic_shifting=True).sigmas.double(), **F32)


@pytest.mark.parametrize("shift", [1.0, SD3_SHIFT])
@pytest.mark.parametrize("steps", [1, 2, 4, 8, 28])
def test_flow_sigmas_match_euler_scheduler(shift, steps):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    ours = flow_sigmas(steps, shift=shift)
    assert len(ours) == steps + 1 and ours[-1] == 0 and ours[0] == 1.0
    torch.testing.assert_close(ours, sched.sigmas.double(), **F32)
    torch.testing.assert_close(timestep_from_sigma(ours[:-1]), sched.timesteps.double(), **T32)
    lcm = FlowMatchLCMScheduler(shift=shift)
    lcm.set_timesteps(steps)
    torch.testing.assert_close(ours, lcm.sigmas.double(), **F32)


def test_sd3_schedule_reference_values():
    # SD3's shift applies twice to the last point: linspace ends at S1(1/T), then the whole line is shifted
    s = flow_sigmas(4, shift=3.0)
    expected_last = shift_sigmas(shift_sigmas(torch.tensor(0.001, dtype=D), 3.0), 3.0)
    assert float(s[-2]) == pytest.approx(float(expected_last), rel=1e-12) and float(s[-2]) == pytest.approx(0.00893,
                                                                                                           abs=1e-5)
    with pytest.raises(LcmkitError):
        flow_sigmas(0)


@pytest.mark.parametrize("seq_len", [64, 256, 1024, 4096, 6000])
def test_dynamic_shift_mu_matches_calculate_shift(seq_len):
    assert dynamic_shift_mu(seq_len) == pytest.approx(calculate_shift(seq_len), rel=1e-12, abs=1e-12)
    assert dynamic_shift_mu(seq_len, 256, 4096, 0.5, 1.16) == pytest.approx(
        calculate_shift(seq_len, 256, 4096, 0.5, 1.16), rel=1e-12, abs=1e-12)  # the SD3 pipeline's default


def test_mu_end_points():
    assert dynamic_shift_mu(256) == pytest.approx(0.5, abs=1e-15)
    assert dynamic_shift_mu(4096) == pytest.approx(1.15, abs=1e-15)


@pytest.mark.parametrize("seq_len", [16, 256, 1024, 4096])
@pytest.mark.parametrize("steps", [1, 4, 28])
def test_flux_sigmas_match_dynamic_shift(seq_len, steps):
    """FluxPipeline: sigmas = linspace(1, 1/N, N) and μ(L) into a dynamic-shifting scheduler."""
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(seq_len))
    torch.testing.assert_close(flux_sigmas(steps, seq_len), sched.sigmas.double(), **F32)
    # dynamic shifting without given sigmas (the SD3 pipeline with use_dynamic_shifting)
    mu = dynamic_shift_mu(seq_len)
    sched.set_timesteps(steps, mu=mu)
    torch.testing.assert_close(flow_sigmas(steps, mu=mu), sched.sigmas.double(), **F32)


def test_exponential_time_shift_is_fixed_shift_with_exp_mu():
    sigma = torch.linspace(0.001, 1, 200, dtype=D)
    for mu in (0.5, 1.15, -0.3):
        torch.testing.assert_close(time_shift_exponential(sigma, mu), shift_sigmas(sigma, math.exp(mu)),
                                   rtol=1e-13, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Forward process, parameterisation, consistency function
# ---------------------------------------------------------------------------------------------------------------

def test_forward_process_matches_scale_noise_and_round_trips():
    sched = FlowMatchEulerDiscreteScheduler(shift=SD3_SHIFT)
    sched.set_timesteps(8)
    float64_sigmas(sched)
    x0, eps = torch.randn(SHAPE, dtype=D), torch.randn(SHAPE, dtype=D)
    t = sched.timesteps[[0, 5]]
    ref = sched.scale_noise(x0, t, eps)
    sigma = sched.sigmas[[0, 5]]
    torch.testing.assert_close(flow_noise(x0, eps, sigma), ref, rtol=0, atol=1e-15)
    x_t, v = flow_noise(x0, eps, sigma), velocity_target(x0, eps)
    torch.testing.assert_close(x0_from_velocity(x_t, v, sigma), x0, rtol=0, atol=1e-14)
    torch.testing.assert_close(eps_from_velocity(x_t, v, sigma), eps, rtol=0, atol=1e-14)
    torch.testing.assert_close(velocity_from_x0(x_t, x0, sigma), v, rtol=0, atol=1e-13)


def test_consistency_function_is_identity_at_zero():
    x, v = torch.randn(SHAPE, dtype=D), torch.randn(SHAPE, dtype=D)
    assert torch.equal(flow_consistency_function(x, v, 0.0), x)  # exactly, for any v
    out = flow_consistency_function(x, v, torch.tensor([0.0, 0.7], dtype=D))
    assert torch.equal(out[0], x[0]) and not torch.allclose(out[1], x[1])
    # on the true path it returns the clean sample, whatever σ
    x0, eps = torch.randn(SHAPE, dtype=D), torch.randn(SHAPE, dtype=D)
    for sigma in (0.0, 0.3, 1.0):
        torch.testing.assert_close(flow_consistency_function(flow_noise(x0, eps, sigma), eps - x0, sigma), x0,
                                   rtol=0, atol=1e-14)


def test_cfg_on_velocity():
    """CFG on v with diffusers' scale w is lcmkit's cfg with ω = w − 1, and commutes with x̂0 = x − σ·v."""
    x, v_c, v_u = (torch.randn(SHAPE, dtype=D) for _ in range(3))
    w, sigma = 4.5, 0.6
    v = cfg(v_c, v_u, w - 1)
    torch.testing.assert_close(v, v_u + w * (v_c - v_u), rtol=0, atol=1e-14)
    torch.testing.assert_close(x0_from_velocity(x, v, sigma),
                               cfg(x0_from_velocity(x, v_c, sigma), x0_from_velocity(x, v_u, sigma), w - 1),
                               rtol=0, atol=1e-13)


@pytest.mark.parametrize("shift,mu", [(1.0, None), (SD3_SHIFT, None), (1.0, 1.15)])
def test_training_grid_on_the_shifted_table(shift, mu):
    grid = flow_training_grid(1000, 20, shift=shift, mu=mu)
    assert len(grid) == 51 and grid[0] == 0 and float(grid[-1]) == pytest.approx(1.0, abs=1e-15)
    assert (grid.diff() > 0).all()
    if mu is None:  # every point but 0 is an entry of the scheduler's training table, bit for bit
        table = train_sigmas(shift=shift)
        assert torch.isin(grid[1:], table).all()
        assert torch.equal(grid[1:], table.flip(0)[19::20])
        ref = FlowMatchEulerDiscreteScheduler(shift=shift).sigmas.double().flip(0)[19::20]
        torch.testing.assert_close(grid[1:], ref, **F32)
    else:
        torch.testing.assert_close(grid[1:], time_shift_exponential(torch.arange(1, 51, dtype=D) / 50, mu))
    hi, lo = flow_consistency_pair(grid, torch.arange(50))
    assert torch.equal(hi, grid[1:]) and torch.equal(lo, grid[:-1]) and lo[0] == 0
    assert torch.equal(flow_training_grid(1000, 1, shift=shift)[1:], train_sigmas(shift=shift).flip(0))
    with pytest.raises(LcmkitError):
        flow_training_grid(1000, 0)


# ---------------------------------------------------------------------------------------------------------------
# Steps against diffusers' schedulers
# ---------------------------------------------------------------------------------------------------------------

def schedules():
    euler = FlowMatchEulerDiscreteScheduler(shift=SD3_SHIFT)
    flux = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    return {"sd3": (euler, dict()), "flux": (flux, dict(sigmas=np.linspace(1, 0.25, 4), mu=calculate_shift(1024)))}


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_euler_step_equals_scheduler(kind):
    sched, kwargs = schedules()[kind]
    sched.set_timesteps(None if kwargs else 4, **kwargs)
    sigmas = float64_sigmas(sched)
    model = make_velocity_model()
    x = torch.randn(SHAPE, dtype=D, generator=torch.Generator().manual_seed(1))
    for i, t in enumerate(sched.timesteps):
        x = x.float().double()  # diffusers' step casts the sample to float32: feed both sides that sample
        out = model(x, t)
        ref = sched.step(out, t, x, return_dict=False)[0]
        torch.testing.assert_close(euler_flow_step(x, out, sigmas[i], sigmas[i + 1]), ref, rtol=0, atol=1e-12)
        x = ref


@pytest.mark.parametrize("shift,mu", [(SD3_SHIFT, None), (1.0, 0.8)])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_step_equals_flow_match_lcm_scheduler(shift, mu, steps):
    sched = FlowMatchLCMScheduler(shift=shift, use_dynamic_shifting=mu is not None)
    sched.set_timesteps(steps, mu=mu)
    sigmas = float64_sigmas(sched)
    model = make_velocity_model(2)
    x_1 = torch.randn(SHAPE, dtype=D, generator=torch.Generator().manual_seed(3))
    g_ref, g_ours = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    x = x_1.clone()
    for i, t in enumerate(sched.timesteps):  # one step at a time, each side fed the same float32-valued sample
        x = x.float().double()
        v = model(x, t)
        ref = sched.step(v, t, x, generator=g_ref, return_dict=False)[0]
        noise = torch.randn(SHAPE, generator=g_ours, dtype=D)  # diffusers draws ε on every step, the last too
        ours, x0_hat = flow_lcm_step(x, v, sigmas[i], sigmas[i + 1], noise)
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(x0_hat, x - sigmas[i] * v, rtol=0, atol=0)
        x = ref
    assert torch.equal(x, x0_hat)  # σ_N = 0: the last step returns x̂0 exactly
    # the whole sampler: the same image up to diffusers' float32 rounding of the sample between steps
    ours = sample_flow_lcm(as_flow_denoiser(model), x_1.clone(), flow_sigmas(steps, shift=shift, mu=mu),
                           torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours, x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_heun_sampler_equals_flow_match_heun_scheduler(steps):
    sched = FlowMatchHeunDiscreteScheduler(shift=SD3_SHIFT)
    sched.set_timesteps(steps)
    float64_sigmas(sched)
    model = make_velocity_model(4)
    x_1 = torch.randn(SHAPE, dtype=D, generator=torch.Generator().manual_seed(5))
    x, calls = x_1.clone(), 0
    for t in sched.timesteps:
        x = sched.step(model(x, t), t, x, return_dict=False)[0]
        calls += 1
    assert calls == 2 * steps - 1
    evaluations = []
    den = as_flow_denoiser(model)
    counting = lambda x, s: (evaluations.append(1), den(x, s))[1]  # noqa: E731
    ours = sample_flow_heun(counting, x_1.clone(), flow_sigmas(steps, shift=SD3_SHIFT))
    assert len(evaluations) == 2 * steps - 1
    torch.testing.assert_close(ours, x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("steps", [1, 4, 28])
def test_euler_sampler_equals_euler_scheduler(steps):
    sched = FlowMatchEulerDiscreteScheduler(shift=SD3_SHIFT)
    sched.set_timesteps(steps)
    float64_sigmas(sched)
    model = make_velocity_model(6)
    x_1 = torch.randn(SHAPE, dtype=D, generator=torch.Generator().manual_seed(6))
    x = x_1.clone()
    for t in sched.timesteps:
        x = sched.step(model(x, t), t, x, return_dict=False)[0]
    ours = sample_flow_euler(as_flow_denoiser(model), x_1.clone(), flow_sigmas(steps, shift=SD3_SHIFT))
    torch.testing.assert_close(ours, x, rtol=1e-6, atol=1e-6)


def test_registries_and_costs():
    assert set(FLOW_SOLVERS) == {"euler", "heun"} and FLOW_TEACHER_EVALUATIONS == {"euler": 1, "heun": 2}
    assert set(FLOW_SAMPLERS) == {"lcm", "euler", "heun"}
    den = as_flow_denoiser(make_velocity_model())
    for name, fn in FLOW_SOLVERS.items():
        calls = []
        fn(lambda x, s: (calls.append(1), den(x, s))[1], torch.randn(SHAPE, dtype=D), 0.6, 0.5)  # noqa: B023
        assert len(calls) == FLOW_TEACHER_EVALUATIONS[name]
    # Heun to σ' = 0 keeps the Euler step (per sample), as diffusers' last step
    x = torch.randn(SHAPE, dtype=D)
    mixed = FLOW_SOLVERS["heun"](den, x, torch.tensor([0.3, 0.3], dtype=D), torch.tensor([0.0, 0.1], dtype=D))
    torch.testing.assert_close(mixed[:1], FLOW_SOLVERS["euler"](den, x[:1], 0.3, 0.0), rtol=0, atol=1e-15)
    torch.testing.assert_close(mixed[1:], FLOW_SOLVERS["heun"](den, x[1:], 0.3, 0.1), rtol=0, atol=1e-15)


def gaussian_flow(mu=0.7, s=0.4):
    """Data N(μ, s²) under x_σ = (1 − σ)x0 + σε: the exact velocity and the exact ODE flow map σ → σ'."""
    m = lambda sigma: (1 - sigma) * mu  # noqa: E731
    sd = lambda sigma: math.sqrt((1 - sigma) ** 2 * s**2 + sigma**2)  # noqa: E731

    def denoiser(x, sigma):
        sg = float(sigma.reshape(-1)[0])
        v = -mu + (sg - (1 - sg) * s**2) / sd(sg) ** 2 * (x - m(sg))
        return x - sg * v, v

    def flow(x, sigma, sigma_next):
        return m(sigma_next) + sd(sigma_next) / sd(sigma) * (x - m(sigma))
    return denoiser, flow


@pytest.mark.parametrize("name,order", [("euler", 1), ("heun", 2)])
def test_convergence_order_on_gaussian_flow(name, order):
    denoiser, flow = gaussian_flow()
    x = torch.linspace(-2, 2, 16, dtype=D).reshape(1, 1, 4, 4)
    exact = flow(x, 0.9, 0.1)
    errors = []
    for n in (8, 16, 32):
        sig = torch.linspace(0.9, 0.1, n + 1, dtype=D)
        z = x.clone()
        for i in range(n):
            z = FLOW_SOLVERS[name](denoiser, z, sig[i], sig[i + 1])
        errors.append(float((z - exact).abs().max()))
    rates = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(abs(r - order) < 0.35 for r in rates), (errors, rates)


# ---------------------------------------------------------------------------------------------------------------
# The flow LCD loss (docs/flow-matching.md, L1–L3)
# ---------------------------------------------------------------------------------------------------------------

def _linear_denoiser(a: float):
    """A toy flow model with velocity v = a·x (float64), as a flow denoiser; records the σ it is called with."""
    seen = []

    def denoiser(x, sigma):
        seen.append(sigma.clone())
        v = a * x
        return x - sigma.reshape(-1, 1, 1, 1) * v, v

    return denoiser, seen


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_flow_lcd_loss_is_zero_on_the_exact_flow_of_a_point(solver):
    """For data at a single point z (per sample), v(x, σ) = (x − z)/σ is the exact flow: straight, so Euler and
    Heun land on the trajectory and f = x − σ·v = z everywhere; the loss is 0 whatever the pair."""
    from lcmkit.losses import flow_lcd_loss

    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)

    def exact(x, sigma):
        v = (x - z) / sigma.reshape(-1, 1, 1, 1)
        return z.clone(), v

    grid = flow_training_grid(1000, 250, shift=3.0)  # σ_0 = 0 … σ_4 = 1
    loss, terms = flow_lcd_loss(exact, exact, exact, z, eps, torch.tensor([0, 1, 2, 3]), grid, solver=solver,
                                loss_type="l2")
    assert float(loss) < 1e-28
    torch.testing.assert_close(terms["f_target"], z, rtol=0, atol=1e-12)


def test_flow_lcd_loss_by_hand():
    """The pair (σ_{n+1}, σ_n) of the grid, x = (1 − σ)z + σε, one Euler step of the teacher, f = x − σ·v of student
    and target, the mean squared distance: computed by hand for velocity fields a·x, b·x, c·x."""
    from lcmkit.losses import flow_lcd_loss

    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    index = torch.tensor([0, 7, 49])
    grid = flow_training_grid(1000, 20, shift=3.0)
    teacher, seen_teacher = _linear_denoiser(0.7)
    target, seen_target = _linear_denoiser(-0.3)
    student, seen_student = _linear_denoiser(0.4)
    loss, terms = flow_lcd_loss(student, target, teacher, z, eps, index, grid, solver="euler", loss_type="l2")

    s_hi, s_lo = grid[index + 1].reshape(-1, 1, 1, 1), grid[index].reshape(-1, 1, 1, 1)
    x = (1 - s_hi) * z + s_hi * eps
    x_hat = x + (s_lo - s_hi) * 0.7 * x
    expected = ((x - s_hi * 0.4 * x) - (x_hat - s_lo * -0.3 * x_hat)).pow(2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(seen_teacher[0], grid[index + 1])  # the teacher and student at σ_{n+1} …
    torch.testing.assert_close(seen_student[0], grid[index + 1])
    torch.testing.assert_close(seen_target[0], grid[index])       # … the target at σ_n (σ_0 = 0 for n = 0)
    assert float(terms["sigma_n"][0]) == 0.0 and float(terms["sigma_n_plus_k"][2]) == 1.0
