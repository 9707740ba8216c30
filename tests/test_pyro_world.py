"""α·ELBO of the Pyro optimality model and the agent's hot-path objective agree, with a
trained dynamics ensemble as the (sampled, TS-1) dynamics.

The hot path takes KL_t in closed form where the prior is a tanh-Gaussian and
couples a step's reward and next state through one member; the Pyro model samples
log π/p and draws the reward's member apart.  Both are unbiased estimates of the same
J(s), so they are compared in expectation, within four standard errors of their
difference, each error estimated from its own repeated draws.
"""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch

from mbvi.models.dynamics import DynamicsEnsemble
from mbvi.models.dynamics_module import DynamicsModule
from mbvi.planners import Direct
from mbvi.pyro import OptimalityModel
from mbvi.pyro.world import world_model_programs
from mbvi.variational.model_value import ModelBasedValue
from mbvi.variational.objectives import TrajectoryObjective
from mbvi.variational.priors import ConstantTanhGaussianPrior, UniformPrior
from mbvi.variational.values import TwinQ

ALPHA, GAMMA = 0.4, 0.95


@pytest.fixture(scope="module")
def trained():
    """A 3-member ensemble fitted to 2,000 random-action Pendulum-v1 transitions."""
    torch.manual_seed(0)
    env = gym.make("Pendulum-v1")
    obs, _ = env.reset(seed=0)
    rows = []
    rng = np.random.default_rng(0)
    for _ in range(2000):
        a = rng.uniform(-1, 1, 1)
        nxt, r, term, trunc, _ = env.step(2.0 * a)
        rows.append((obs, a, r, nxt, term))
        obs = env.reset()[0] if term or trunc else nxt
    s, a, r, s2, d = (torch.as_tensor(np.array(x), dtype=torch.float32) for x in zip(*rows))
    model = DynamicsEnsemble(members=3, elites=2, hidden=(64, 64))
    model.build(3, 1)
    DynamicsModule(model, max_epochs=30, patience=5).fit_transitions(s, a, r, s2, d)
    return model, s[:3]


@pytest.mark.parametrize("prior_cls", [ConstantTanhGaussianPrior, UniformPrior])
@pytest.mark.parametrize("horizon", [0, 3])
def test_alpha_elbo_equals_the_hot_path_objective_in_expectation(trained, prior_cls, horizon):
    model, states = trained
    torch.manual_seed(1)
    prior = prior_cls()
    prior.build(3, 1)
    engine = Direct(hidden=(32,))
    engine.build(3, 1)
    leaf = TwinQ(hidden=(32,))
    leaf.build(3, 1)
    value = ModelBasedValue(model=model, leaf=leaf, horizon=horizon, future="engine")
    value.bind(prior, engine, lambda: torch.tensor(ALPHA), GAMMA)

    def leaf_value(s, a):
        return leaf(s, a, frozen=True)

    dynamics, reward = world_model_programs(model)
    n, repeats = 500, 12
    pyro_model = OptimalityModel(prior, leaf_value, ALPHA, horizon, n, dynamics, reward, GAMMA)
    guide = pyro_model.guide(posterior=engine.infer(states), policy=engine.infer)
    objective = TrajectoryObjective(states, lambda s, a: value(s, a, frozen=True), prior, ALPHA)
    with torch.no_grad():
        hot = torch.stack([objective(engine.infer(states), n)[0].sum() for _ in range(repeats)])
        elbo = torch.stack([pyro_model.elbo(guide, states) for _ in range(repeats)])
    se = math.sqrt(hot.var() / repeats + elbo.var() / repeats)
    diff = float(hot.mean() - elbo.mean())
    assert abs(diff) < 4 * se, (float(hot.mean()), float(elbo.mean()), se)
    # The check has power: leaving out one step's reward moves the hot path by far more.
    assert 4 * se < 0.25 * abs(float(hot.mean())) or horizon == 0
