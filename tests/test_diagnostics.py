"""The amortisation gap: non-negative, and zero for an engine that is already optimal."""

import torch

from mbvi.diagnostics import amortisation_gap, objective_value
from mbvi.distributions import TanhGaussian
from mbvi.objectives import Objective
from mbvi.planners import Direct, GradientRefinement
from mbvi.planners.base import InferenceEngine
from mbvi.priors import ConstantTanhGaussianPrior


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
    objective = Objective(s, lambda s_, a: 0.0 * a.sum(-1), prior, alpha=1.0)
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
