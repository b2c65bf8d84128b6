"""lcmkit.denoisers on tiny random UNets: conventions the training code relies on."""

from __future__ import annotations

import pytest
import tiny
import torch

from lcmkit.denoisers import (
    TextConditioning,
    consistency_fn,
    unet_denoiser,
    unet_output,
)
from lcmkit.math.guidance import guidance_embedding
from lcmkit.math.schedule import alpha_sigma, alphas_cumprod_from_config

torch.set_num_threads(1)
AC = alphas_cumprod_from_config(tiny.SD_SCHEDULE)


def _inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    cond = TextConditioning(torch.randn(batch, 16, 32, generator=g))
    uncond = TextConditioning(torch.randn(batch, 16, 32, generator=g))
    return x, torch.tensor([999, 259])[:batch], cond, uncond


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_x0_eps_consistent_with_forward_process(prediction_type):
    """Whatever the parameterisation, x_t = α_t·x̂0 + σ_t·ε̂ holds for the returned pair."""
    unet = tiny.tiny_unet()
    x, t, cond, _ = _inputs()
    with torch.no_grad():
        x0, eps = unet_denoiser(unet, AC, cond, prediction_type=prediction_type)(x, t)
    a, s = (v.float().view(-1, 1, 1, 1) for v in alpha_sigma(AC, t))
    torch.testing.assert_close(a * x0 + s * eps, x, atol=1e-4, rtol=1e-4)


def test_batched_cfg_equals_two_forwards_with_per_sample_omega():
    unet = tiny.tiny_unet()
    x, t, cond, uncond = _inputs()
    omega = torch.tensor([0.0, 6.5])
    with torch.no_grad():
        x0, eps = unet_denoiser(unet, AC, cond, uncond=uncond, omega=omega)(x, t)
        e_c, e_u = unet_output(unet, x, t, cond), unet_output(unet, x, t, uncond)
    expected = (1 + omega.view(-1, 1, 1, 1)) * e_c - omega.view(-1, 1, 1, 1) * e_u
    torch.testing.assert_close(eps, expected, atol=1e-5, rtol=1e-5)


def test_w_embedding_is_required_and_used():
    unet = tiny.tiny_unet(time_cond_proj_dim=256)
    x, t, cond, _ = _inputs()
    with pytest.raises(ValueError, match="w_omega"):
        unet_denoiser(unet, AC, cond)
    with pytest.raises(ValueError, match="w_omega"):
        unet_denoiser(tiny.tiny_unet(), AC, cond, w_omega=1.0)
    omega = torch.tensor([2.0, 7.0])
    with torch.no_grad():
        _, eps = unet_denoiser(unet, AC, cond, w_omega=omega)(x, t)
        direct = unet_output(unet, x, t, cond, guidance_embedding(omega, 256))
    torch.testing.assert_close(eps, direct)



def test_sampling_loop_computes_its_constants_once(monkeypatch):
    """An LCM sampling loop embeds ω and tabulates α, σ once per call, not once per step (on a small UNet the
    per-step tensor ops outside it are what `bench speed` reports as overhead), and gives the same sample as
    the step-by-step formulas: f = c_skip·x + c_out·x̂0, then α_{τ+1}·f + σ_{τ+1}·ε."""
    import lcmkit.denoisers as denoisers
    from lcmkit.math.consistency import consistency_function
    from lcmkit.solvers import sample_lcm

    calls = {"embed": 0, "alpha_sigma": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(denoisers, "guidance_embedding", counted("embed", denoisers.guidance_embedding))
    monkeypatch.setattr(denoisers, "alpha_sigma", counted("alpha_sigma", denoisers.alpha_sigma))
    unet = tiny.tiny_unet(time_cond_proj_dim=256)
    x, _, cond, _ = _inputs()
    timesteps = [999, 759, 499, 259]
    with torch.no_grad():
        denoiser = unet_denoiser(unet, AC, cond, w_omega=6.5)
        sample = sample_lcm(denoiser, x, timesteps, AC, torch.Generator().manual_seed(1))
        assert calls == {"embed": 1, "alpha_sigma": 1}
        # the same loop written out step by step, with the same noise
        g, z = torch.Generator().manual_seed(1), x
        for i, t in enumerate(timesteps):
            tb = torch.full((2,), t)
            x0 = unet_output(unet, z, tb, cond, guidance_embedding(torch.full((2,), 6.5), 256))
            a, s = (v.float().view(-1, 1, 1, 1) for v in alpha_sigma(AC, tb))
            f = consistency_function(z, (z - s * x0) / a, t)
            if i + 1 < len(timesteps):
                a1, s1 = (v.float() for v in alpha_sigma(AC, timesteps[i + 1]))
                z = a1 * f + s1 * torch.randn(z.shape, generator=g)
    torch.testing.assert_close(sample, f, atol=1e-5, rtol=1e-5)


def test_memoised_constants_survive_inference_mode():
    """A denoiser first called under torch.inference_mode (sampling) can then be trained through: its memoised
    ω embedding and α/σ table are ordinary tensors."""
    unet = tiny.tiny_unet(time_cond_proj_dim=256)
    x, t, cond, _ = _inputs()
    denoiser = unet_denoiser(unet, AC, cond, w_omega=6.5)
    with torch.inference_mode():
        denoiser(x, t)
    x0, _ = denoiser(x, t)
    x0.square().mean().backward()
    assert unet.time_embedding.cond_proj.weight.grad is not None

def test_consistency_fn_boundary_and_grad():
    """f(x, 0) = x (paper eq. 2), and gradients reach the student's parameters."""
    unet = tiny.tiny_unet()
    x, _, cond, _ = _inputs()
    f = consistency_fn(unet_denoiser(unet, AC, cond))
    torch.testing.assert_close(f(x, torch.tensor([0, 0])), x)
    f(x, torch.tensor([999, 19])).square().mean().backward()
    assert unet.conv_out.weight.grad is not None and unet.conv_out.weight.grad.abs().sum() > 0
