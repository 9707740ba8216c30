"""The Pyro optimality model (Fig. 1a) against its plain-torch twin: α·ELBO equals
``native_objective`` on the same samples, and for H = 0 equals Eq. 16's ``TrajectoryObjective``."""

from __future__ import annotations

import pytest
import torch
from pyro import poutine

from mbvi.errors import ConfigError
from mbvi.models.mlp import mlp
from mbvi.models.policy import GaussianHead
from mbvi.pyro import ClosedUniform, OptimalityModel, compiled_objective, native_objective
from mbvi.variational.distributions import TanhGaussian
from mbvi.variational.objectives import TrajectoryObjective
from mbvi.variational.priors import ConstantTanhGaussianPrior, LearnedPrior, Prior, UniformPrior

S, A, B, N, ALPHA = 3, 2, 4, 8, 0.3


class NetworkPrior(Prior):
    """A small learned prior p_θ(a|s) = tanh(N(f_θ(s))) (MPO-style)."""

    def build(self, obs_dim: int, act_dim: int) -> None:
        super().build(obs_dim, act_dim)
        self.net = GaussianHead(obs_dim, act_dim, (8,))

    def distribution(self, s: torch.Tensor) -> TanhGaussian:
        return TanhGaussian(*self.net(s))


def _uniform_in_entropy_form():
    prior = UniformPrior()
    prior.set_kl_form("entropy")  # the agent's default for the uniform prior
    return prior


PRIORS = {
    "uniform": UniformPrior,
    "uniform_entropy_form": _uniform_in_entropy_form,
    "tanh_gaussian": lambda: ConstantTanhGaussianPrior(0.2, 0.7),
    "network": NetworkPrior,
    "learned": lambda: LearnedPrior(hidden=(8,)),  # the E-step sees its target copy
}


@pytest.fixture
def world():
    """Leaf Q̂ (MLP), linear dynamics, quadratic reward, a policy network, states."""
    torch.manual_seed(0)
    q_net = mlp(S + A, (16,), 1)
    weight = 0.3 * torch.randn(S + A, S)

    def leaf(s, a):
        s = s.unsqueeze(1).expand(-1, a.shape[1], -1)
        return q_net(torch.cat([s, a], -1)).squeeze(-1)

    def dynamics(s, a):
        return s + torch.cat([s, a], -1) @ weight

    def reward(s, a):
        return -s.square().sum(-1) - 0.1 * a.square().sum(-1)

    policy_net = GaussianHead(S, A, (16,))
    return {
        "leaf": leaf,
        "dynamics": dynamics,
        "reward": reward,
        "net": policy_net,
        "policy": lambda s: TanhGaussian(*policy_net(s)),
        "states": torch.randn(B, S),
    }


def make_model(world, prior_name, horizon, gamma=1.0):
    prior = PRIORS[prior_name]()
    prior.build(S, A)
    return OptimalityModel(
        prior, world["leaf"], ALPHA, horizon, N, world["dynamics"], world["reward"], gamma
    )


@pytest.mark.parametrize("horizon", [0, 3])
@pytest.mark.parametrize("prior_name", list(PRIORS))
def test_elbo_times_alpha_equals_native_on_the_same_samples(world, prior_name, horizon):
    model = make_model(world, prior_name, horizon)
    guide = model.guide(policy=world["policy"])
    guide_trace = poutine.trace(guide).get_trace(world["states"])
    actions = torch.stack([guide_trace.nodes[f"a_{t}"]["value"] for t in range(horizon + 1)])

    elbo = model.elbo(poutine.replay(guide, trace=guide_trace), world["states"])
    j, metrics = native_objective(model, world["states"], policy=world["policy"], actions=actions)

    assert j.shape == (B,) and metrics["kl"].shape == (B,)
    torch.testing.assert_close(elbo, j.sum(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("prior_name", list(PRIORS))
def test_same_seed_gives_same_value_and_gradient(world, prior_name):
    """Pyro's pathwise gradient and native's agree sample for sample (H = 3, γ = 0.9)."""
    model = make_model(world, prior_name, horizon=3, gamma=0.9)
    # A learned prior enters the E-step through its target copy: no gradient reaches θ.
    prior_params = [p for p in model.prior.parameters() if p.requires_grad]
    params = list(world["net"].parameters()) + prior_params
    torch.manual_seed(1)
    elbo = model.elbo(model.guide(policy=world["policy"]), world["states"])
    pyro_grads = torch.autograd.grad(elbo, params, allow_unused=True)
    torch.manual_seed(1)
    j, _ = native_objective(model, world["states"], policy=world["policy"])
    native_grads = torch.autograd.grad(j.sum(), params, allow_unused=True)

    torch.testing.assert_close(elbo, j.sum(), rtol=1e-4, atol=1e-5)
    assert all(g is not None for g in pyro_grads[: len(params) - len(prior_params)])
    for g_pyro, g_native in zip(pyro_grads, native_grads, strict=True):
        if g_pyro is None or g_native is None:
            assert g_pyro is None and g_native is None
        else:
            torch.testing.assert_close(g_pyro, g_native, rtol=1e-4, atol=1e-5)


def test_compiled_objective_matches_native_value_and_gradient(world):
    """The compiled hot path computes the same J and gradient on the same samples."""
    model = make_model(world, "tanh_gaussian", horizon=2, gamma=0.9)
    params = list(world["net"].parameters())
    states = world["states"][:1]  # act-sized: one state
    torch.manual_seed(4)
    actions = torch.tanh(torch.randn(3, 1, N, A))
    j, metrics = native_objective(model, states, policy=world["policy"], actions=actions)
    grads = torch.autograd.grad(j.sum(), params)
    j_c, metrics_c = compiled_objective()(model, states, policy=world["policy"], actions=actions)
    grads_c = torch.autograd.grad(j_c.sum(), params)

    torch.testing.assert_close(j_c, j, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(metrics_c["kl"], metrics["kl"], rtol=1e-4, atol=1e-5)
    for g_c, g in zip(grads_c, grads, strict=True):
        torch.testing.assert_close(g_c, g, rtol=1e-4, atol=1e-5)


def test_h0_native_equals_objective_with_uniform_prior(world):
    """H = 0 is Eq. 16: with a uniform prior TrajectoryObjective's KL is the same sample estimate."""
    model = make_model(world, "uniform", horizon=0)
    posterior = world["policy"](world["states"])
    torch.manual_seed(2)
    j_native, _ = native_objective(model, world["states"], posterior=posterior)
    torch.manual_seed(2)
    j_hot, _ = TrajectoryObjective(world["states"], world["leaf"], model.prior, ALPHA)(posterior, N)
    torch.testing.assert_close(j_native, j_hot)


@pytest.mark.parametrize("prior_name", ["tanh_gaussian", "network", "learned"])
def test_h0_sample_kl_estimates_objectives_analytic_kl(world, prior_name):
    """With a tanh-Gaussian prior TrajectoryObjective (the agent's hot path) uses the analytic KL;
    the ELBO's sample KL has the same E[Q̂] on the same samples and averages to the
    analytic KL."""
    model = make_model(world, prior_name, horizon=0)
    model.n_particles = 4000
    objective = TrajectoryObjective(world["states"], world["leaf"], model.prior, ALPHA)
    posterior = world["policy"](world["states"])
    torch.manual_seed(3)
    _, native = native_objective(model, world["states"], posterior=posterior)
    torch.manual_seed(3)
    _, hot = objective(posterior, model.n_particles)
    torch.testing.assert_close(native["return"], hot["q"])
    torch.testing.assert_close(native["kl"], hot["kl"], atol=0.05, rtol=0.05)


def test_sites_per_step(world):
    trace = poutine.trace(make_model(world, "network", horizon=3)).get_trace(world["states"])
    sites = [n for n, s in trace.nodes.items() if s["type"] == "sample"]
    assert sites == [
        "states", "particles", "a_0", "r_0", "a_1", "r_1", "a_2", "r_2", "a_3", "leaf"
    ]  # fmt: skip
    assert trace.nodes["a_2"]["value"].shape == (B, N, A)
    assert trace.nodes["r_1"]["fn"].log_factor.shape == (B, N)

    trace = poutine.trace(make_model(world, "uniform", horizon=0)).get_trace(world["states"])
    assert [n for n, s in trace.nodes.items() if s["type"] == "sample"][2:] == ["a_0", "leaf"]


def test_guide_from_a_fixed_posterior_at_h0(world):
    model = make_model(world, "tanh_gaussian", horizon=0)
    posterior = world["policy"](world["states"])
    guide = model.guide(posterior)
    trace = poutine.trace(guide).get_trace(world["states"])
    j, _ = native_objective(
        model, world["states"], posterior, actions=trace.nodes["a_0"]["value"][None]
    )
    torch.testing.assert_close(
        model.elbo(poutine.replay(guide, trace=trace), world["states"]), j.sum()
    )


def test_bad_configurations_raise_config_errors(world):
    with pytest.raises(ConfigError, match="alpha must be > 0"):
        OptimalityModel(UniformPrior(), world["leaf"], 0.0, act_dim=A)
    with pytest.raises(ConfigError, match="needs dynamics and reward_fn"):
        OptimalityModel(UniformPrior(), world["leaf"], 1.0, horizon=2, act_dim=A)
    with pytest.raises(ConfigError, match="needs a policy"):
        make_model(world, "uniform", horizon=2).guide(world["policy"](world["states"]))


def test_closed_uniform_has_finite_density_on_the_boundary():
    box = ClosedUniform(-torch.ones(2), torch.ones(2)).to_event(1)
    log_p = box.log_prob(torch.tensor([[1.0, -1.0], [0.0, 0.5]]))
    torch.testing.assert_close(log_p, torch.full((2,), -2 * torch.log(torch.tensor(2.0)).item()))


def test_native_stays_finite_for_saturated_actions(world):
    """tanh(u) rounds to ±1 for |u| > 9 in float32; native never inverts tanh."""

    def saturated(rows: int) -> TanhGaussian:
        return TanhGaussian(torch.full((rows, A), 12.0), torch.full((rows, A), -3.0))

    model = make_model(world, "uniform", horizon=3)
    loc = torch.full((B, A), 12.0, requires_grad=True)
    posterior = TanhGaussian(loc, torch.full((B, A), -3.0))
    policy = lambda s: saturated(s.shape[0])  # noqa: E731
    j, metrics = native_objective(model, world["states"], posterior, policy)
    (grad,) = torch.autograd.grad(j.sum(), loc)
    assert torch.isfinite(j).all() and torch.isfinite(grad).all()
    assert torch.isfinite(metrics["kl"]).all()
