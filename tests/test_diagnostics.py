"""The amortisation gap (non-negative, zero for an engine that is already optimal) and
the improvement per inference iteration (Fig. 2)."""

import pytest
import torch

from mbvi.planners import Direct, GradientRefinement, Iterative
from mbvi.planners.base import InferenceEngine
from mbvi.variational.diagnostics import (
    amortisation_gap,
    iteration_improvement,
    iteration_values,
    objective_value,
)
from mbvi.variational.distributions import TanhGaussian
from mbvi.variational.objectives import TrajectoryObjective
from mbvi.variational.priors import ConstantTanhGaussianPrior

try:  # tests/ imported as a package (tests/__init__.py) or as a plain folder
    from tests.quadratic import exact_j, make_objective
except ImportError:
    from quadratic import exact_j, make_objective


class Fixed(InferenceEngine):
    """Returns the same posterior for every state."""

    def __init__(self, loc: float, log_scale: float):
        super().__init__()
        self.loc, self.log_scale = loc, log_scale

    def infer(self, s, objective):
        shape = (s.shape[0], self.act_dim)
        return TanhGaussian(torch.full(shape, self.loc), torch.full(shape, self.log_scale))


def setup(engine):
    prior = ConstantTanhGaussianPrior()
    prior.build(3, 2)
    engine.build(3, 2)
    refiner = GradientRefinement(steps=200, lr=0.05, n_samples=64)
    refiner.build(3, 2)
    s = torch.randn(16, 3)
    # Q = 0 makes the prior the optimum of Eq. 16: J̃ = −α KL(π‖p) is maximal at π = p.
    objective = TrajectoryObjective(s, lambda s_, a: 0.0 * a.sum(-1), prior, alpha=1.0)
    return refiner, s, objective


def test_gap_is_zero_at_the_optimum_and_positive_elsewhere():
    torch.manual_seed(0)
    optimal = Fixed(0.0, 0.0)
    refiner, s, objective = setup(optimal)
    at_optimum = amortisation_gap(optimal, refiner, s, objective)
    assert abs(at_optimum["inference/amortisation_gap"]) < 1e-3
    engine = Fixed(0.8, -1.0)
    engine.build(3, 2)
    away = amortisation_gap(engine, refiner, s, objective)
    # KL of N(0.8, e^-2) to N(0, 1) per dim is 0.5 (e^-2 + 0.64 - 1 + 2) ≈ 0.89, two dims
    assert away["inference/j_engine"] < -1.7
    assert away["inference/amortisation_gap"] > 1.6


def test_objective_value_uses_common_random_numbers():
    torch.manual_seed(1)
    engine = Direct(hidden=(8,))
    refiner, s, objective = setup(engine)
    post = engine.infer(s, objective)
    assert torch.equal(objective_value(objective, post, 32), objective_value(objective, post, 32))


def test_iteration_values_score_each_iterate_on_common_noise():
    """Row k is J̃ of λ_k: close to the closed form of the quadratic objective, the same
    whatever the state batching, and λ_0 is the prior."""
    torch.manual_seed(2)
    engine = Iterative(hidden=(16, 16), iterations=3, n_samples=8)
    engine.build(3, 2)
    objective, m = make_objective(40, 3, 2)
    values = iteration_values(engine, objective.states, objective, n_eval=4096, batch=16)
    assert values.shape == (4, 40)
    torch.manual_seed(3)  # the engine's own gradient noise repeats under the same seed
    again = iteration_values(engine, objective.states, objective, n_eval=4096, batch=40)
    torch.manual_seed(3)
    posteriors, _ = engine.unroll(objective.states, objective)
    exact = torch.stack([exact_j(m, p.loc.detach(), p.log_scale.detach()) for p in posteriors])
    torch.testing.assert_close(again, exact, rtol=0.0, atol=0.15)
    torch.testing.assert_close(values[0], again[0], rtol=0.0, atol=0.15)
    assert torch.equal(
        values[0], iteration_values(engine, objective.states, objective, 4096, batch=16)[0]
    )


def test_iteration_improvement_is_relative_to_the_initial_mean():
    values = torch.tensor([[-4.0, -2.0], [-2.0, -1.0], [-1.5, -0.5]])  # [K+1=3, B=2]
    absolute, relative = iteration_improvement(values)
    torch.testing.assert_close(absolute, torch.tensor([0.0, 1.5, 2.0]))
    torch.testing.assert_close(relative, torch.tensor([0.0, 0.5, 2.0 / 3.0]))


def test_iteration_values_need_an_iterative_engine():
    engine = Direct(hidden=(8,))
    refiner, s, objective = setup(engine)
    with pytest.raises(ValueError, match="Direct does not infer in iterations.*Iterative"):
        iteration_values(engine, s, objective)
