"""Analytic checks of the tanh-Gaussian (Eq. 13-14) and its KL."""

import math

import pytest
import torch
from torch.distributions import Normal, TransformedDistribution, kl_divergence
from torch.distributions.transforms import TanhTransform

from mbvi.variational.distributions import TanhGaussian, atanh, tanh_log_det
from mbvi.variational.priors import UniformPrior


def _dist(b=4, a=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(b, a, generator=g, dtype=dtype)
    log_scale = 0.5 * torch.randn(b, a, generator=g, dtype=dtype)
    return TanhGaussian(loc, log_scale)


def test_log_prob_matches_change_of_variables():
    d = _dist()
    a, u = d.rsample(7)
    ours = d.log_prob_u(u)
    base = Normal(d.loc.unsqueeze(1), d.log_scale.exp().unsqueeze(1))
    reference = (base.log_prob(u) - torch.log1p(-(torch.tanh(u) ** 2))).sum(-1)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)
    torch_ref = TransformedDistribution(base, TanhTransform()).log_prob(a).sum(-1)
    torch.testing.assert_close(ours, torch_ref, rtol=1e-6, atol=1e-6)


def test_log_prob_from_actions_inverts_tanh():
    d = _dist()
    a, u = d.rsample(5)
    torch.testing.assert_close(d.log_prob(a), d.log_prob_u(u), rtol=1e-8, atol=1e-8)


def test_density_integrates_to_one_in_1d():
    d = TanhGaussian(
        torch.tensor([[0.7]], dtype=torch.float64), torch.tensor([[-0.3]], dtype=torch.float64)
    )
    a = torch.linspace(-1 + 1e-9, 1 - 1e-9, 200_001, dtype=torch.float64)
    p = d.log_prob(a.view(1, -1, 1)).exp().squeeze()
    assert torch.trapezoid(p, a).item() == pytest.approx(1.0, abs=1e-4)


def test_tanh_correction_is_finite_for_large_u():
    u = torch.tensor([[[-30.0, 0.0, 30.0]]])
    out = tanh_log_det(u)
    assert torch.isfinite(out).all()
    # log(1 - tanh(u)^2) ~ log 4 - 2|u| for large |u|
    expected = 2 * (math.log(4) - 60.0) + 0.0
    assert out.item() == pytest.approx(expected, rel=1e-5)


def test_kl_matches_gaussian_closed_form_and_monte_carlo():
    p, q = _dist(seed=1), _dist(seed=2)
    ours = p.kl(q)
    ref = kl_divergence(Normal(p.loc, p.log_scale.exp()), Normal(q.loc, q.log_scale.exp())).sum(-1)
    torch.testing.assert_close(ours, ref)
    torch.manual_seed(0)
    a, u = p.rsample(200_000)
    mc = (p.log_prob_u(u) - q.log_prob_u(u)).mean(-1)
    torch.testing.assert_close(mc, ours, rtol=0.03, atol=0.03)
    assert torch.all(p.kl(p) == 0)


def test_rsample_shapes_bounds_and_gradients():
    loc = torch.zeros(2, 3, requires_grad=True)
    log_scale = torch.zeros(2, 3, requires_grad=True)
    d = TanhGaussian(loc, log_scale)
    a, u = d.rsample(5)
    assert a.shape == u.shape == (2, 5, 3)
    assert (a.abs() < 1).all()
    a.sum().backward()
    assert loc.grad is not None and log_scale.grad is not None
    assert d.mean_action().shape == (2, 3)


def test_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match=r"same shape.*\(2, 3\).*\(2, 4\)"):
        TanhGaussian(torch.zeros(2, 3), torch.zeros(2, 4))


def test_atanh_is_finite_at_the_bounds():
    assert torch.isfinite(atanh(torch.tensor([-1.0, 1.0]))).all()


def test_rsample_with_log_prob_agrees_with_log_prob_u():
    d = _dist()
    torch.manual_seed(4)
    a, u, log_pi = d.rsample_with_log_prob(6)
    torch.manual_seed(4)
    a2, u2 = d.rsample(6)
    torch.testing.assert_close(u, u2)
    torch.testing.assert_close(log_pi, d.log_prob_u(u))


def test_antithetic_draws_come_in_opposite_pairs():
    dist = TanhGaussian(torch.zeros(3, 2), torch.zeros(3, 2))
    eps = dist.standard_normal(6, antithetic=True)
    assert eps.shape == (3, 6, 2)
    torch.testing.assert_close(eps[:, 3:], -eps[:, :3])
    with pytest.raises(ValueError, match="even number of samples, got 5"):
        dist.standard_normal(5, antithetic=True)


def test_uniform_prior_min_kl_is_the_widest_tanh_gaussians():
    """UniformPrior.min_kl_target: log 2 minus the largest entropy of tanh(N(0, σ²)),
    integrated on a grid (the maximiser is μ = 0 by symmetry)."""
    u = torch.linspace(-12.0, 12.0, 48_001, dtype=torch.float64)
    sigmas = torch.linspace(0.80, 0.95, 151, dtype=torch.float64)
    density = torch.exp(-0.5 * (u / sigmas[:, None]) ** 2) / (
        sigmas[:, None] * math.sqrt(2 * math.pi)
    )
    log_jacobian = torch.log1p(-(torch.tanh(u) ** 2)).clamp_min(-1e4)
    entropy = 0.5 * torch.log(2 * math.pi * math.e * sigmas**2) + torch.trapezoid(
        density * log_jacobian, u
    )
    min_kl = math.log(2.0) - entropy.max().item()
    assert abs(sigmas[entropy.argmax()].item() - 0.874) < 0.01
    assert UniformPrior().min_kl_target() == pytest.approx(min_kl, abs=2e-5)
