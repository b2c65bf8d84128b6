"""Consistency losses against hand computations in float64."""

import math

import pytest
import torch

from lcmkit.losses import consistency_distance, lcd_loss, lcf_loss
from lcmkit.math import alpha_sigma, alphas_cumprod_from_config

D = torch.float64
AC = alphas_cumprod_from_config({})


def linear_denoiser(scale):
    """x̂0 = scale·x_t; ε̂ consistent with it. Simple enough to compute the loss by hand."""
    def den(x, t):
        a, s = (v.reshape(-1, 1, 1, 1) for v in alpha_sigma(AC, t))
        x0 = scale * x
        return x0, (x - a * x0) / s
    return den


def scal(t):
    s = 10.0 * t
    return 0.25 / (s * s + 0.25), s / math.sqrt(s * s + 0.25)


@pytest.mark.parametrize("loss_type", ["l2", "huber"])
def test_lcd_loss_matches_hand_computation(loss_type):
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(2, 1, 2, 2, generator=g, dtype=D)
    eps = torch.randn(2, 1, 2, 2, generator=g, dtype=D)
    index = torch.tensor([0, 25])  # pairs (19 → 0) and (519 → 499)
    loss, terms = lcd_loss(linear_denoiser(0.9), linear_denoiser(0.8), linear_denoiser(0.5), z0, eps, index, AC,
                           skip=20, solver="ddim", loss_type=loss_type, huber_c=0.001)
    diffs = []
    for i, (tk, tn) in enumerate([(19, 0), (519, 499)]):
        a_k, s_k = math.sqrt(AC[tk]), math.sqrt(1 - AC[tk])
        a_n, s_n = math.sqrt(AC[tn]), math.sqrt(1 - AC[tn])
        z_k = a_k * z0[i] + s_k * eps[i]
        x0_teacher = 0.5 * z_k
        z_hat = a_n * x0_teacher + s_n * (z_k - a_k * x0_teacher) / s_k  # DDIM
        cs, co = scal(tn)
        f_target = cs * z_hat + co * 0.8 * z_hat
        cs, co = scal(tk)
        f_student = cs * z_k + co * 0.9 * z_k
        diffs.append(f_student - f_target)
        if tn == 0:  # boundary: the target is the solver output itself, exactly
            assert torch.equal(terms["f_target"][i], terms["z_n_hat"][i])
    delta = torch.stack(diffs)
    expected = (delta**2).mean() if loss_type == "l2" else (torch.sqrt(delta**2 + 1e-6) - 1e-3).mean()
    assert terms["t_n_plus_k"].tolist() == [19, 519] and terms["t_n"].tolist() == [0, 499]
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-15)


def test_lcd_loss_gradient_flows_only_to_student():
    scale = torch.tensor(0.9, dtype=D, requires_grad=True)
    tgt_scale = torch.tensor(0.8, dtype=D, requires_grad=True)

    def student(x, t):
        return scale * x, x

    def target(x, t):
        return tgt_scale * x, x
    z0 = torch.randn(3, 1, 2, 2, dtype=D)
    loss, _ = lcd_loss(student, target, linear_denoiser(0.5), z0, torch.randn_like(z0), torch.tensor([3, 10, 40]), AC)
    loss.backward()
    assert scale.grad is not None and scale.grad != 0 and tgt_scale.grad is None


def test_lcf_loss_is_zero_when_data_is_zero():
    """z0 = 0 and ε = 0 make both points 0; any model with x̂0(0) = 0 then has f = 0 at both: zero loss."""
    z0 = torch.zeros(2, 1, 2, 2, dtype=D)
    loss, _ = lcf_loss(linear_denoiser(0.0), linear_denoiser(0.0), z0, torch.zeros_like(z0), torch.tensor([5, 9]), AC)
    assert float(loss) == 0.0


@pytest.mark.parametrize("loss_type", ["l2", "huber"])
def test_lcf_loss_matches_hand_computation(loss_type):
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(1, 1, 2, 2, generator=g, dtype=D)
    eps = torch.randn(1, 1, 2, 2, generator=g, dtype=D)
    loss, terms = lcf_loss(linear_denoiser(0.7), linear_denoiser(0.6), z0, eps, torch.tensor([12]), AC, skip=20,
                           loss_type=loss_type)
    tk, tn = 259, 239
    z_k = math.sqrt(AC[tk]) * z0 + math.sqrt(1 - AC[tk]) * eps
    z_n = math.sqrt(AC[tn]) * z0 + math.sqrt(1 - AC[tn]) * eps  # same z0, same ε
    cs, co = scal(tk)
    f_s = cs * z_k + co * 0.7 * z_k
    cs, co = scal(tn)
    f_t = cs * z_n + co * 0.6 * z_n
    delta = f_s - f_t
    expected = (delta**2).mean() if loss_type == "l2" else (torch.sqrt(delta**2 + 1e-6) - 1e-3).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(terms["z_n"], z_n)


def test_second_order_teacher_is_used():
    z0 = torch.randn(2, 1, 2, 2, dtype=D)
    eps = torch.randn_like(z0)
    losses = {s: float(lcd_loss(linear_denoiser(0.9), linear_denoiser(0.8), linear_denoiser(0.5), z0, eps,
                                torch.tensor([20, 30]), AC, solver=s)[0]) for s in ("ddim", "dpm-solver", "dpm-solver++")}
    assert len(set(losses.values())) == 3


def test_distance_rejects_unknown():
    with pytest.raises(ValueError):
        consistency_distance(torch.zeros(1), torch.zeros(1), "l1")
