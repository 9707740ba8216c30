"""The trajectory objective and the model-based value against hand computations."""

import math

import pytest
import torch

from mbvi.errors import ConfigError
from mbvi.planners import Direct
from mbvi.variational.distributions import TanhGaussian
from mbvi.variational.model_value import ModelBasedValue
from mbvi.variational.objectives import TrajectoryObjective, trajectory_return
from mbvi.variational.priors import ConstantTanhGaussianPrior, UniformPrior
from mbvi.variational.rollouts import rollout
from mbvi.variational.values import TwinQ
from tests.toy_world import LinearWorld

S, A, B, N = 3, 2, 4, 5


def test_trajectory_return_is_the_discounted_soft_sum():
    g = torch.Generator().manual_seed(0)
    h, gamma, alpha = 3, 0.9, 0.3
    r = torch.randn(h, B, N, generator=g)
    kl = torch.rand(h + 1, B, N, generator=g)
    alive = torch.ones(h + 1, B, N)
    alive[2:, 0, 0] = 0.0  # particle (0, 0) terminated at step 1: steps 2.. count nothing
    leaf = torch.randn(B, N, generator=g)
    expected = sum(gamma**t * alive[t] * (r[t] - alpha * kl[t]) for t in range(h))
    expected = expected + gamma**h * alive[h] * (leaf - alpha * kl[h])
    got = trajectory_return(r, kl, alive, leaf, alpha, gamma)
    torch.testing.assert_close(got, expected)
    assert got[0, 0] == pytest.approx(
        float(r[0, 0, 0] - alpha * kl[0, 0, 0] + gamma * (r[1, 0, 0] - alpha * kl[1, 0, 0]))
    )


def test_lambda_return_weights_the_truncated_returns():
    g = torch.Generator().manual_seed(1)
    h, gamma, alpha, lam = 3, 0.95, 0.2, 0.7
    r = torch.randn(h, B, N, generator=g)
    kl = torch.rand(h + 1, B, N, generator=g)
    alive = torch.ones(h + 1, B, N)
    values = torch.randn(h + 1, B, N, generator=g)

    def truncated(k):  # G^(k): k steps, then the soft value at s_k
        steps = sum(gamma**t * (r[t] - alpha * kl[t]) for t in range(k))
        return steps + gamma**k * (values[k] - alpha * kl[k])

    expected = (1 - lam) * (truncated(1) + lam * truncated(2)) + lam**2 * truncated(3)
    torch.testing.assert_close(trajectory_return(r, kl, alive, values, alpha, gamma, lam), expected)
    # λ = 1 is the H-step return alone
    torch.testing.assert_close(
        trajectory_return(r, kl, alive, values, alpha, gamma, 1.0), truncated(3)
    )


def _value(horizon, future="engine", gamma=0.9, alpha=0.25, lam=1.0, world=None, prior=None):
    world = world if world is not None else LinearWorld()
    value = ModelBasedValue(
        model=world,
        leaf=TwinQ(hidden=(16,)),
        horizon=horizon,
        future=future,
        propagation="expectation",
        lam=lam,
    )
    value.build(S, A)
    engine = Direct(hidden=(16,))
    engine.build(S, A)
    prior = prior if prior is not None else ConstantTanhGaussianPrior(0.1, 0.8)
    prior.build(S, A)
    value.bind(prior, engine, lambda: torch.tensor(alpha), gamma)
    return value, engine, prior


def test_horizon_zero_is_the_leaf_critic():
    torch.manual_seed(0)
    value, _, _ = _value(horizon=0)
    s, a = torch.randn(B, S), torch.rand(B, N, A) * 2 - 1
    torch.testing.assert_close(value(s, a), value.leaf(s, a))
    torch.testing.assert_close(value(s, a, frozen=True), value.leaf(s, a, frozen=True))


def test_model_based_value_equals_a_hand_computed_sum():
    """H = 2, γ = 0.9 on the linear world; future actions from the engine's posterior
    (the same noise, drawn in the same order), their KL to the constant prior in
    closed form."""
    torch.manual_seed(0)
    gamma, alpha = 0.9, 0.25
    value, engine, prior = _value(horizon=2, gamma=gamma, alpha=alpha)
    world, leaf = value.model, value.leaf
    s, a0 = torch.randn(B, S), torch.rand(B, 1, A) * 1.8 - 0.9

    def future(state):
        post = engine.infer(state)
        return post, post.kl(prior.distribution(state))

    torch.manual_seed(1)
    got = value(s, a0)
    torch.manual_seed(1)
    s1, r0 = world.hand_step(s, a0[:, 0])
    post1, kl1 = future(s1)
    a1 = post1.sample(1)[:, 0]
    s2, r1 = world.hand_step(s1, a1)
    post2, kl2 = future(s2)
    a2 = post2.sample(1)[:, 0]
    q2 = leaf(s2, a2.unsqueeze(1))[:, 0]
    expected = r0 + gamma * (r1 - alpha * kl1) + gamma**2 * (q2 - alpha * kl2)
    torch.testing.assert_close(got[:, 0], expected)


def test_termination_stops_the_sum():
    torch.manual_seed(0)
    value, _, _ = _value(horizon=3, future="prior", world=LinearWorld(stop_above=-1e9))
    s, a = torch.randn(B, S), torch.rand(B, N, A) * 2 - 1
    _, r0 = value.model.hand_step(s.unsqueeze(1).expand(B, N, S), a)
    # every first step terminates: Q̂ is the first reward alone
    torch.testing.assert_close(value(s, a), r0)


def test_action_gradient_matches_finite_differences():
    torch.manual_seed(0)
    value, _, _ = _value(horizon=3)
    value.double()
    value._bound[1].double()
    s = torch.randn(2, S, dtype=torch.float64)
    a = (torch.rand(2, 1, A, dtype=torch.float64) * 1.6 - 0.8).requires_grad_(True)

    def q(actions):
        torch.manual_seed(5)  # the same future-policy noise for every evaluation
        return value(s, actions, frozen=True).sum()

    (grad,) = torch.autograd.grad(q(a), a)
    eps = 1e-6
    fd = torch.zeros_like(a)
    for idx in range(a.numel()):
        d = torch.zeros_like(a).view(-1)
        d[idx] = eps
        d = d.view_as(a)
        fd.view(-1)[idx] = (q(a + d) - q(a - d)) / (2 * eps)
    torch.testing.assert_close(grad, fd, rtol=1e-5, atol=1e-7)
    assert grad.abs().sum() > 0


def test_inference_trains_neither_the_model_nor_the_critic():
    torch.manual_seed(0)
    value, engine, prior = _value(horizon=2)
    s = torch.randn(B, S)
    objective = TrajectoryObjective(s, lambda x, y: value(x, y, frozen=True), prior, 0.25)
    loss, _ = engine.loss(s, objective)
    loss.backward()
    assert all(p.grad is None for p in value.model.parameters())
    assert all(p.grad is None for p in value.leaf.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in engine.parameters())
    # without freezing, the same loss would reach them: the check can fail
    objective = TrajectoryObjective(s, value, prior, 0.25)
    engine.loss(s, objective)[0].backward()
    assert any(p.grad is not None for p in value.model.parameters())


def test_rollout_shapes_and_prior_future_actions_carry_no_kl():
    torch.manual_seed(0)
    world = LinearWorld()
    world.build(S, A)
    prior = UniformPrior()
    prior.build(S, A)
    roll = rollout(world.step, torch.randn(B, S), torch.rand(B, N, A), 4, prior)
    assert roll.states.shape == (5, B, N, S) and roll.actions.shape == (5, B, N, A)
    assert roll.rewards.shape == (4, B, N) and roll.kl.shape == (5, B, N)
    assert (roll.kl == 0).all() and (roll.alive == 1).all()
    assert roll.actions.abs().max() <= 1


def test_bad_options_are_refused_at_configuration_time():
    with pytest.raises(ConfigError, match="horizon must be >= 0"):
        ModelBasedValue(model=LinearWorld(), horizon=-1)
    with pytest.raises(ConfigError, match="lam must be in"):
        ModelBasedValue(model=LinearWorld(), lam=0.0)
    with pytest.raises(ConfigError, match="propagation must be one of"):
        ModelBasedValue(model=LinearWorld(), propagation="ts9")


def test_objective_at_horizon_zero_is_eq16():
    """J̃ with a model-free critic is E_π[Q̂] − α KL: the objective every engine trains on."""
    torch.manual_seed(0)
    q = TwinQ(hidden=(16,))
    q.build(S, A)
    prior = ConstantTanhGaussianPrior()
    prior.build(S, A)
    s = torch.randn(B, S)
    post = TanhGaussian(torch.randn(B, A), torch.full((B, A), -1.0))
    objective = TrajectoryObjective(s, q, prior, 0.5)
    assert objective.horizon == 0
    torch.manual_seed(2)
    j, m = objective(post, 8)
    torch.manual_seed(2)
    a, _ = post.rsample(8)
    expected = q(s, a).mean(-1) - 0.5 * post.kl(prior.distribution(s))
    torch.testing.assert_close(j, expected)
    assert math.isfinite(float(m["kl"].mean()))


def test_branched_rollouts_stop_at_a_predicted_termination():
    torch.manual_seed(0)
    value, _, _ = _value(horizon=1, world=LinearWorld(stop_above=0.0))
    value.synthetic_horizon = 3
    s = torch.randn(64, S)
    s0, a, r, s2, term = value.synthetic_transitions(s)
    assert s0.shape[1] == S and a.shape[1] == A and r.shape == term.shape == (s0.shape[0],)
    # every rollout's first step is kept; a later step only for rollouts still alive
    n1 = 64
    n2 = int((term[:n1] == 0).sum())
    n3 = int((term[n1 : n1 + n2] == 0).sum())
    assert 0 < n2 < n1 and s0.shape[0] == n1 + n2 + n3
    torch.testing.assert_close(s0[n1 : n1 + n2], s2[:n1][term[:n1] == 0])
    torch.testing.assert_close(s2[:64], s @ value.model.W + a[:64] @ value.model.B)
    assert set(term.tolist()) <= {0.0, 1.0}


def test_synthetic_ratio_outside_the_unit_interval_is_refused():
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match=r"synthetic_ratio must be in \[0, 1\]"):
            ModelBasedValue(model=LinearWorld(), synthetic_ratio=bad)
