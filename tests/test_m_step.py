"""The M-step's TD target composed by hand: the target critics, the KL term in V(s'),
and the terminated flag."""

import pytest
import torch

from mbvi.planners import Direct
from mbvi.training.m_step import m_step_losses
from mbvi.variational.priors import ConstantTanhGaussianPrior, UniformPrior
from mbvi.variational.values import TwinQ

S, A, B = 3, 2, 6


@pytest.mark.parametrize("prior_cls", [ConstantTanhGaussianPrior, UniformPrior])
def test_value_loss_regresses_on_a_hand_built_td_target(prior_cls):
    torch.manual_seed(0)
    value, engine, prior = TwinQ(hidden=(16,)), Direct(hidden=(16,)), prior_cls()
    for part in (value, engine, prior):
        part.build(S, A)
    # Targets that differ from the online critics, so using the wrong ones shows.
    with torch.no_grad():
        for p in value.q_target.parameters():
            p.add_(0.3 * torch.randn_like(p))
    log_alpha = torch.tensor(-1.2, requires_grad=True)
    gamma = 0.9
    s, a, s2 = torch.randn(B, S), torch.rand(B, A) * 2 - 1, torch.randn(B, S)
    r = torch.randn(B)
    term = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 0.0])

    torch.manual_seed(7)
    _, metrics = m_step_losses(value, engine, prior, log_alpha, 1.0, gamma, s, a, r, s2, term)

    torch.manual_seed(7)  # the TD target's draw is the update's first
    alpha = log_alpha.detach().exp()
    with torch.no_grad():
        post = engine.infer(s2)
        if prior_cls is UniformPrior:
            a2, u2, log_pi = post.rsample_with_log_prob(1)
            kl = (log_pi - prior.log_prob(s2, a2, u2)).mean(-1)
        else:
            a2, _ = post.rsample(1)
            kl = post.kl(prior.distribution(s2))
        q_next = value.q_target(s2, a2).min(0).values[:, 0]  # target critics, clipped
        y = r + gamma * (1.0 - term) * (q_next - alpha * kl)
        qs = value.q(s, a.unsqueeze(1))[..., 0]  # online critics [2, B]
        expected = 0.5 * (qs - y).pow(2).mean(-1).sum()
    torch.testing.assert_close(metrics["loss/value"], expected)

    # The terminated rows' targets are r alone: the loss changes if they bootstrap.
    wrong_y = r + gamma * (q_next - alpha * kl)
    assert not torch.allclose(0.5 * (qs - wrong_y).pow(2).mean(-1).sum(), expected)
