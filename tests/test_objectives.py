"""Eq. 16, the soft TD target and the temperature loss."""

import math

import pytest
import torch

from mbvi.variational.distributions import TanhGaussian
from mbvi.variational.objectives import (
    TrajectoryObjective,
    alpha_loss,
    entropy_alpha_loss,
    soft_objective,
    soft_td_target,
)
from mbvi.variational.priors import ConstantTanhGaussianPrior, UniformPrior


def _posterior(b=3, a=2):
    torch.manual_seed(0)
    return TanhGaussian(torch.randn(b, a), 0.3 * torch.randn(b, a))


def test_alpha_loss_sign_and_fixed_point():
    log_alpha = torch.zeros((), requires_grad=True)
    # KL above target: descending the loss must raise alpha.
    alpha_loss(log_alpha, torch.tensor([3.0, 5.0]), kl_target=1.0).backward()
    assert log_alpha.grad.item() == pytest.approx(1.0 - 4.0)
    log_alpha.grad = None
    alpha_loss(log_alpha, torch.tensor([0.5]), kl_target=1.0).backward()
    assert log_alpha.grad.item() > 0  # below target: alpha falls
    log_alpha.grad = None
    alpha_loss(log_alpha, torch.tensor([1.0, 1.0]), kl_target=1.0).backward()
    assert log_alpha.grad.item() == 0.0  # fixed point at KL = KL*


def test_alpha_loss_equals_sac_entropy_loss_under_uniform_prior():
    act_dim = 6
    log_pi = torch.tensor([-2.0, 1.0, 4.0])
    log_alpha = torch.tensor(0.3)
    kl = log_pi + act_dim * math.log(2)  # KL(π‖U) sample estimate
    kl_target = act_dim * UniformPrior().default_kl_target()
    sac = -(log_alpha * (log_pi + (-act_dim))).mean()  # SAC, H* = -A
    assert alpha_loss(log_alpha, kl, kl_target).item() == pytest.approx(sac.item())


def test_soft_td_target_bootstraps_through_truncation_only():
    r = torch.tensor([1.0, 1.0])
    term = torch.tensor([0.0, 1.0])
    v = torch.tensor([10.0, 10.0])
    torch.testing.assert_close(soft_td_target(r, term, v, 0.9), torch.tensor([10.0, 1.0]))


def test_objective_uses_analytic_kl_for_tanh_gaussian_prior():
    post = _posterior()
    prior = ConstantTanhGaussianPrior(loc=0.2, scale=0.5)
    prior.build(4, 2)
    s = torch.zeros(3, 4)
    obj = TrajectoryObjective(s, lambda s_, a: a.sum(-1), prior, alpha=0.7)
    torch.manual_seed(1)
    j, m = obj(post, 10)
    torch.manual_seed(1)
    a, _ = post.rsample(10)
    expected = a.sum(-1).mean(-1) - 0.7 * post.kl(prior.distribution(s))
    torch.testing.assert_close(j, expected)
    torch.testing.assert_close(m["kl"], post.kl(prior.distribution(s)))


def test_objective_sample_kl_for_uniform_prior():
    post = _posterior()
    prior = UniformPrior()
    prior.build(4, 2)
    s = torch.zeros(3, 4)
    obj = TrajectoryObjective(s, lambda s_, a: torch.zeros(a.shape[:-1]), prior, alpha=2.0)
    torch.manual_seed(3)
    j, m = obj(post, 5)
    torch.manual_seed(3)
    a, u = post.rsample(5)
    kl = (post.log_prob_u(u) + 2 * math.log(2)).mean(-1)
    torch.testing.assert_close(m["kl"], kl)
    torch.testing.assert_close(j, soft_objective(torch.zeros(3, 5), kl, 2.0))


@pytest.mark.parametrize("prior_cls", [UniformPrior, ConstantTanhGaussianPrior])
def test_objective_reports_log_pi_of_its_samples(prior_cls):
    """``log_pi`` is the mean log π of the very samples E[Q̂] used, under a closed-form
    KL too; in the entropy form the uniform prior's KL term is that log π itself."""
    post, s = _posterior(), torch.zeros(3, 4)
    prior = prior_cls()
    prior.build(4, 2)
    obj = TrajectoryObjective(s, lambda s_, a: a.sum(-1), prior, alpha=0.5)
    torch.manual_seed(4)
    _, m = obj(post, 6)
    torch.manual_seed(4)
    _, u = post.rsample(6)
    log_pi = post.log_prob_u(u).mean(-1)
    torch.testing.assert_close(m["log_pi"], log_pi)
    if prior_cls is UniformPrior:
        prior.set_kl_form("entropy")
        torch.manual_seed(4)
        j, m = obj(post, 6)
        torch.testing.assert_close(m["kl"], log_pi)
        torch.testing.assert_close(j, m["q"] - 0.5 * log_pi)  # E[Q̂] + α H(π)


def test_entropy_alpha_loss_sign_and_fixed_point():
    log_alpha = torch.zeros((), requires_grad=True)
    # Entropy −log π = 3, above the target −2: descending the loss must lower α.
    entropy_alpha_loss(log_alpha, torch.tensor([-3.0]), target_entropy=-2.0).backward()
    assert log_alpha.grad.item() == pytest.approx(3.0 - (-2.0))
    log_alpha.grad = None
    entropy_alpha_loss(log_alpha, torch.tensor([2.0, 2.0]), target_entropy=-2.0).backward()
    assert log_alpha.grad.item() == 0.0  # fixed point at H(π) = H*


def test_objective_gradient_matches_finite_differences():
    """∂J̃/∂loc with common random numbers equals central differences."""
    prior = ConstantTanhGaussianPrior()
    prior.build(1, 2)
    s = torch.zeros(1, 1, dtype=torch.float64)
    q = lambda s_, a: -((a - 0.3) ** 2).sum(-1)  # noqa: E731
    loc = torch.tensor([[0.1, -0.2]], dtype=torch.float64, requires_grad=True)
    log_scale = torch.full((1, 2), -1.0, dtype=torch.float64)

    def j(l):
        torch.manual_seed(0)
        prior_dist = TanhGaussian(torch.zeros_like(l), torch.zeros_like(l))
        obj = TrajectoryObjective(s, q, prior, 0.1)
        obj.prior_dist = prior_dist
        return obj(TanhGaussian(l, log_scale), 64)[0].sum()

    (grad,) = torch.autograd.grad(j(loc), loc)
    eps = 1e-6
    for i in range(2):
        d = torch.zeros_like(loc)
        d[0, i] = eps
        fd = (j(loc.detach() + d) - j(loc.detach() - d)) / (2 * eps)
        assert grad[0, i].item() == pytest.approx(fd.item(), rel=1e-5, abs=1e-8)


def test_sample_kl_of_a_saturated_posterior_reads_its_pre_tanh_samples():
    """A model rollout's future actions from a posterior far past the tanh's knee round
    to ±1 in float32; their KL to the uniform prior is read at u itself, and matches
    the same samples' KL computed in float64 with torch.distributions."""
    from torch.distributions import Normal
    from torch.distributions.transforms import TanhTransform

    from mbvi.variational.rollouts import _next_action

    torch.manual_seed(0)
    loc, log_scale = torch.full((4, 2), 12.0), torch.zeros(4, 2)
    prior = UniformPrior()
    prior.build(3, 2)
    posterior = TanhGaussian(loc, log_scale)
    torch.manual_seed(1)
    a, kl = _next_action(torch.zeros(4, 1, 3), prior, lambda rows: posterior)
    assert (a.abs() == 1.0).float().mean() > 0.5  # saturated in float32
    torch.manual_seed(1)
    _, u = posterior.rsample(1)
    u = u.double()
    log_pi = Normal(loc.double()[:, None], 1.0).log_prob(u)
    log_pi = (log_pi - TanhTransform().log_abs_det_jacobian(u, torch.tanh(u))).sum(-1)
    expected = log_pi + 2 * math.log(2.0)  # − log p = A log 2
    torch.testing.assert_close(kl.double(), expected, rtol=1e-4, atol=1e-3)
