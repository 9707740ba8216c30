"""Priors written as Pyro programs (examples/mixture_prior.py): ELBO of any engine's
posterior under them, importance-sampling planning (Eq. 11), and the errors a badly
written program gets."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from mbvi.errors import ConfigError
from mbvi.planners import Direct
from mbvi.pyro import OptimalityModel, importance_plan, native_objective
from mbvi.variational.distributions import TanhGaussian

S, A, B, N, ALPHA = 3, 4, 2, 64, 0.1
_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mixture_prior.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("mixture_prior", _EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = _load_example()


@pytest.fixture
def states():
    torch.manual_seed(0)
    return torch.randn(B, S)


def _mixture_log_prob(prior, a):
    """log p(a) of the two-gait prior written out by hand: tanh change of variables."""
    u = torch.atanh(a)
    gaits = torch.atanh(prior.gaits)  # [2, A]
    normal = torch.distributions.Normal(gaits, 0.3)
    log_u = torch.logsumexp(normal.log_prob(u.unsqueeze(-2)).sum(-1) + math.log(0.5), -1)
    return log_u - torch.log1p(-a.square()).sum(-1)


def test_elbo_of_an_engine_under_a_prior_program(states):
    """α·ELBO = Σ_b mean_n [Q̂ − α (log π − log p_mix)] on the guide's own samples."""
    prior = example.make_two_gait_prior(A)
    value = example.prefers_first_gait(prior.gaits[0])
    model = OptimalityModel(prior, value, ALPHA, n_particles=N, act_dim=A)
    engine = Direct(hidden=(16,))
    engine.build(S, A)
    posterior = engine.infer(states)
    guide = model.guide(posterior)
    trace = poutine.trace(guide).get_trace(states)
    a = trace.nodes["a_0"]["value"]

    elbo = model.elbo(poutine.replay(guide, trace=trace), states)
    by_hand = value(states, a) - ALPHA * (posterior.log_prob(a) - _mixture_log_prob(prior, a))
    torch.testing.assert_close(elbo, by_hand.mean(-1).sum(), rtol=1e-4, atol=1e-4)


def test_importance_weights_are_boltzmann_weights_of_prior_samples(states):
    """Eq. 11 with H = 0: w_n ∝ exp(Q̂(s, a_n)/α) for a_n ~ p."""
    prior = example.make_two_gait_prior(A)
    value = example.prefers_first_gait(prior.gaits[0])
    plan = importance_plan(OptimalityModel(prior, value, ALPHA, n_particles=N, act_dim=A), states)

    assert plan.particles.shape == (B, N, A) and plan.log_weights.shape == (B, N)
    expected = torch.log_softmax(value(states, plan.particles) / ALPHA, -1)
    torch.testing.assert_close(plan.log_weights, expected)
    assert torch.all((plan.ess() >= 1) & (plan.ess() <= N))


def test_importance_with_a_guide_proposal_weighs_by_model_over_guide(states):
    prior = example.make_two_gait_prior(A)
    value = example.prefers_first_gait(prior.gaits[0])
    model = OptimalityModel(prior, value, ALPHA, n_particles=N, act_dim=A)
    posterior = TanhGaussian(torch.zeros(B, A), torch.zeros(B, A))
    plan = importance_plan(model, states, guide=model.guide(posterior))

    a = plan.particles
    log_w = value(states, a) / ALPHA + _mixture_log_prob(prior, a) - posterior.log_prob(a)
    torch.testing.assert_close(plan.log_weights, torch.log_softmax(log_w, -1), rtol=1e-4, atol=1e-4)


def test_planning_picks_the_preferred_gait():
    result = example.main(n_states=2, seed=0)
    assert torch.all(result["distance_to_first_gait"] < 0.3)
    assert math.isfinite(result["elbo_times_alpha"])


def test_stochastic_dynamics_program_with_horizon(states):
    """A user's dynamics may sample: its sites appear per step in model and guide."""

    def dynamics(s, a):
        noise = pyro.sample("noise", dist.Normal(torch.zeros(S), 0.1).to_event(1))
        return s + 0.1 * a[..., :1] + noise

    prior = example.make_two_gait_prior(A)
    model = OptimalityModel(
        prior, example.prefers_first_gait(prior.gaits[0]), ALPHA, horizon=2, n_particles=8,
        dynamics=dynamics, reward_fn=lambda s, a: -s.square().sum(-1), act_dim=A,
    )  # fmt: skip
    policy = lambda s: TanhGaussian(torch.zeros(s.shape[0], A), torch.zeros(s.shape[0], A))  # noqa: E731
    trace = poutine.trace(model.guide(policy=policy)).get_trace(states)
    assert {"noise_0", "noise_1", "a_2"} <= set(trace.nodes)
    assert torch.isfinite(model.elbo(model.guide(policy=policy), states))
    plan = importance_plan(model, states)
    assert plan.best_action().shape == (B, A)


def _program(sample):
    def bad_prior(s):
        return sample()

    return bad_prior


def _uniform(width, dims):
    return dist.Uniform(-width * torch.ones(dims), width * torch.ones(dims))


BAD_PROGRAMS = {
    "no action site": (
        lambda: pyro.sample("action", _uniform(1.0, A).to_event(1)),
        r"'bad_prior' has no action site: it sampled \['action'\].*\(2, 8, 4\)",
    ),
    "wrong action dim": (
        lambda: pyro.sample("a", _uniform(1.0, 3).to_event(1)),
        r"action site 'a' \(recorded as 'a_0'\) has shape \(2, 8, 3\).*expected \(2, 8, 4\)",
    ),
    "no event dim": (
        lambda: pyro.sample("a", _uniform(1.0, A)),
        r"'bad_prior' failed inside the plates.*site 'a'.*event shape \(4,\)",
    ),
    "unbounded support": (
        lambda: pyro.sample("a", dist.Normal(torch.zeros(A), 1.0).to_event(1)),
        r"action site 'a' \(recorded as 'a_0'\) sampled -?\d\.\d+ .*support Real.* must lie in \[-1, 1\]\^4",
    ),
    "too wide support": (
        lambda: pyro.sample("a", _uniform(2.0, A).to_event(1)),
        r"action site 'a' .*sampled -?1\.\d+ .*support .*Interval.* must lie in \[-1, 1\]\^4",
    ),
}


@pytest.mark.parametrize("case", list(BAD_PROGRAMS))
def test_bad_prior_programs_get_clear_errors(states, case):
    sample, message = BAD_PROGRAMS[case]
    model = OptimalityModel(_program(sample), lambda s, a: a.sum(-1), 1.0, n_particles=8, act_dim=A)
    with pytest.raises(ConfigError, match=message):
        importance_plan(model, states)


def test_prior_program_needs_act_dim_positive_alpha_and_pyro_for_elbo(states):
    prior = example.make_two_gait_prior(A)
    value = example.prefers_first_gait(prior.gaits[0])
    with pytest.raises(ConfigError, match="act_dim is required"):
        OptimalityModel(prior, value, ALPHA)
    with pytest.raises(ConfigError, match=r"alpha must be > 0 .*got -0.5"):
        OptimalityModel(prior, value, -0.5, act_dim=A)
    model = OptimalityModel(prior, value, ALPHA, act_dim=A)
    with pytest.raises(ConfigError, match="native_objective needs an mbvi Prior"):
        native_objective(model, states, TanhGaussian(torch.zeros(B, A), torch.zeros(B, A)))


def test_the_importance_engine_agrees_with_the_pyro_reference():
    """mbvi.planners.ImportanceSampling (the agent's engine) and importance_plan (Pyro)
    sample the same Boltzmann posterior (Eq. 11): their weighted mean actions agree
    within four standard errors of the difference, over 24 replicate states."""
    from mbvi.planners import ImportanceSampling
    from mbvi.variational.objectives import TrajectoryObjective
    from mbvi.variational.priors import ConstantTanhGaussianPrior

    torch.manual_seed(0)
    prior = ConstantTanhGaussianPrior(0.0, 0.8)
    prior.build(S, A)
    target = torch.tensor([0.5, -0.3, 0.2, -0.6])[:A]

    def value(s, a):
        return -0.3 * (a - target).square().sum(-1)

    states = torch.zeros(24, S)
    k = 2000
    engine = ImportanceSampling(n_particles=k)
    engine.build(S, A)
    with torch.no_grad():
        ours = engine.infer(states, TrajectoryObjective(states, value, prior, ALPHA)).mean_action()
    plan = importance_plan(OptimalityModel(prior, value, ALPHA, n_particles=k), states)
    ref = plan.mean_action()
    diff = ours.mean(0) - ref.mean(0)
    se = (ours.var(0) / 24 + ref.var(0) / 24).sqrt()
    assert (diff.abs() < 4 * se).all(), (ours.mean(0), ref.mean(0), se)
    # both moved well away from the prior's mean towards the target
    assert (ours.mean(0) * target > 0).all() and (ours.mean(0).abs() > 10 * se).all()
