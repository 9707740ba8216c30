"""mbvi's ``SMC`` against Pyro's ``SMCFilter`` running the same SMCP planner
(``mbvi.pyro.smc_reference``): both must give the same posterior over first actions.

The problem: ``LinearWorld`` (s' = s W + a B, r = −‖s‖² − 0.1‖a‖², deterministic) in
2-D state and action, the leaf Q̂(s, a) = −C_Q ‖s W + a B‖² (the value of the state
the action leads to), a constant tanh-Gaussian prior that is also the proposal, α, γ,
H = 3 actions, resampling (systematic) at every step on both sides.

Each side plans R replicate times with K particles; per replicate we take the weighted
mean and variance of each first-action dimension.  The two sides' replicate averages
must agree within Z = 4 standard errors of their difference, SE = sqrt(se_mbvi² +
se_pyro²), each se the replicates' standard deviation / √R.
"""

import math
from functools import partial

import torch

from mbvi.planners import SMC
from mbvi.pyro.smc_reference import SMCReference
from mbvi.variational.model_value import ModelBasedValue
from mbvi.variational.objectives import TrajectoryObjective
from mbvi.variational.priors import ConstantTanhGaussianPrior
from mbvi.variational.values import ValueEstimate
from tests.toy_world import LinearWorld

OBS, ACT, K, H, R, Z = 2, 2, 4000, 3, 16, 4.0
C_Q, SIGMA_P, ALPHA, GAMMA = 1.0, 0.8, 0.5, 0.9
S0 = (1.0, -0.6)
F64 = torch.float64


class QuadraticLeaf(ValueEstimate):
    """Q̂(s, a) = −C_Q ‖s W + a B‖² with the world's W and B."""

    def __init__(self, world: LinearWorld):
        super().__init__()
        object.__setattr__(self, "world", world)  # not a submodule: W, B belong to the world

    def forward(self, s, a, frozen=False):
        nxt = s.unsqueeze(-2) @ self.world.W + a @ self.world.B
        return -C_Q * nxt.pow(2).sum(-1)


def _problem():
    """(bound ModelBasedValue, prior), in float64."""
    world = LinearWorld()
    value = ModelBasedValue(model=world, leaf=QuadraticLeaf(world), horizon=1)
    value.build(OBS, ACT)
    value.to(F64)
    prior = ConstantTanhGaussianPrior(0.0, SIGMA_P)
    prior.build(OBS, ACT)
    prior.to(F64)
    value.bind(prior, None, lambda: ALPHA, GAMMA)
    return value, prior


def _moments(a: torch.Tensor, log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean and variance of first actions ``a`` [..., K, A], each [..., A]."""
    w = log_w.exp().unsqueeze(-1).to(a.dtype)
    mean = (w * a).sum(-2)
    return mean, (w * (a - mean.unsqueeze(-2)).pow(2)).sum(-2)


def _mbvi_moments(value, prior):
    engine = SMC(n_particles=K, horizon=H, resample="systematic", ess_threshold=1.0)
    engine.build(OBS, ACT)
    engine.to(F64)
    s = torch.tensor(S0, dtype=F64).expand(R, OBS)  # R replicate states
    post = engine.infer(s, TrajectoryObjective(s, partial(value, frozen=True), prior, ALPHA))
    assert not post.collapsed.any()
    return _moments(post.particles, post.log_weights)


def _pyro_moments(value, prior):
    ref = SMCReference(
        prior, value.model, partial(value.leaf, frozen=True), ALPHA, GAMMA, H, K,
        ess_threshold=1.0,
    )  # fmt: skip
    s = torch.tensor(S0, dtype=F64)
    runs = [_moments(*ref.plan(s)) for _ in range(R)]
    return torch.stack([m for m, _ in runs]), torch.stack([v for _, v in runs])


def test_smc_matches_pyro_smcfilter_on_first_actions():
    torch.manual_seed(0)
    value, prior = _problem()
    ours, theirs = _mbvi_moments(value, prior), _pyro_moments(value, prior)
    for name, x, y in zip(("mean", "variance"), ours, theirs, strict=True):
        se_x, se_y = x.std(0) / math.sqrt(R), y.std(0) / math.sqrt(R)
        se = (se_x.square() + se_y.square()).sqrt()
        gap = (x.mean(0) - y.mean(0)).abs()
        assert (gap < Z * se).all(), (name, x.mean(0), y.mean(0), se)
    # Not vacuous: the posterior mean is far from the prior's 0 in SE units, and both
    # sides are precise (SE well below the posterior's spread).
    mean_ours, var_ours = ours[0].mean(0), ours[1].mean(0)
    se_mean = ours[0].std(0) / math.sqrt(R)
    assert (mean_ours.abs() > 10 * se_mean).all(), (mean_ours, se_mean)
    assert (se_mean < 0.02 * var_ours.sqrt()).all(), (se_mean, var_ours)
