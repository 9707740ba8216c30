"""A linear-quadratic planning problem whose Boltzmann posterior is Gaussian in closed
form, for the sampling planners' tests (``test_planners_np``, ``test_planner_mechanics``).

The problem is exact in pre-tanh space u = atanh(a), where tanh's Jacobian is shared
by prior and posterior and so cancels:

    prior      p(u_t) = N(0, σ_p²)                  (ConstantTanhGaussianPrior(0, σ_p))
    world      s' = s + u,  r = −C_S s² − C_U u²    (``ShiftWorld``, deterministic)
    leaf       Q(s, a) = −C_Q (s + u)²              (``QuadraticLeaf``)

so the trajectory posterior Π_t p(u_t) exp(G/α) over u_{0:H-1}, with G the discounted
return of ``_sampling.sequence_returns``, is a Gaussian whose mean and covariance
``exact_posterior`` computes from G's gradient and Hessian (G written out by hand).
At H = 1 it is Eq. 11 with the model-free value Q.
"""

import math
from functools import partial

import torch

from mbvi.planners import InferenceEngine
from mbvi.variational.distributions import TanhGaussian, atanh
from mbvi.variational.model_value import ModelBasedValue
from mbvi.variational.objectives import TrajectoryObjective
from mbvi.variational.particles import WeightedParticles
from mbvi.variational.priors import ConstantTanhGaussianPrior
from mbvi.variational.values import ValueEstimate
from mbvi.variational.world_model import Step, WorldModel

C_S, C_U, C_Q, SIGMA_P, ALPHA, GAMMA, S0 = 0.5, 0.2, 1.0, 0.6, 1.0, 0.9, 1.0
F64 = torch.float64


class ShiftWorld(WorldModel):
    """s' = s + atanh(a), r = −C_S s² − C_U atanh(a)²: linear-quadratic in u."""

    def step(self, s, a, propagation="ts1", generator=None) -> Step:
        u = atanh(a)
        reward = -C_S * s.pow(2).sum(-1) - C_U * u.pow(2).sum(-1)
        return Step(s + u, reward, torch.zeros_like(reward))


class QuadraticLeaf(ValueEstimate):
    """Q(s, a) = −C_Q (s + atanh(a))²: the value of the state the action leads to."""

    def forward(self, s, a, frozen=False):
        return -C_Q * (s.unsqueeze(-2) + atanh(a)).pow(2).sum(-1)


def _prior(dtype=F64):
    prior = ConstantTanhGaussianPrior(0.0, SIGMA_P)
    prior.build(1, 1)
    return prior.to(dtype)


def model_free_objective(b: int) -> TrajectoryObjective:
    """Eq. 11 with Q = ``QuadraticLeaf`` at b identical states s = S0 (replicates)."""
    s = torch.full((b, 1), S0, dtype=F64)
    return TrajectoryObjective(s, QuadraticLeaf(), _prior(), ALPHA)


def model_based_objective(b: int) -> TrajectoryObjective:
    """The agent's objective over a bound ``ModelBasedValue`` of the toy world."""
    value = ModelBasedValue(model=ShiftWorld(), leaf=QuadraticLeaf(), horizon=1)
    value.build(1, 1)
    prior = _prior()
    value.bind(prior, None, lambda: ALPHA, GAMMA)
    s = torch.full((b, 1), S0, dtype=F64)
    return TrajectoryObjective(s, partial(value, frozen=True), prior, ALPHA)


def exact_posterior(horizon: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [H], covariance [H,H]) of the Gaussian posterior over u_{0:H-1}."""

    def g(u):  # the return of one trajectory, by hand
        s, total = torch.tensor(S0, dtype=F64), 0.0
        for t in range(horizon - 1):
            total = total + GAMMA**t * (-C_S * s**2 - C_U * u[t] ** 2)
            s = s + u[t]
        return total + GAMMA ** (horizon - 1) * (-C_Q * (s + u[-1]) ** 2)

    zero = torch.zeros(horizon, dtype=F64)
    grad = torch.autograd.functional.jacobian(g, zero)
    hess = torch.autograd.functional.hessian(g, zero)  # G(u) = G(0) + grad·u + ½ uᵀ hess u
    precision = torch.eye(horizon, dtype=F64) / SIGMA_P**2 - hess / ALPHA
    cov = torch.linalg.inv(precision)
    return cov @ grad / ALPHA, cov


def _engine(engine: InferenceEngine) -> InferenceEngine:
    engine.build(1, 1)
    return engine.to(F64)


def _moments(post: WeightedParticles) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean and variance of u per state, each [B]."""
    u, w = post.u()[..., 0], post.weights
    mean = (w * u).sum(-1)
    return mean, (w * (u - mean.unsqueeze(-1)).pow(2)).sum(-1)


def _assert_matches(post: WeightedParticles, mean: float, var: float, z: float = 4.0):
    """The replicate states' estimates, averaged, equal the exact moments within z
    standard errors of that average (the SE estimated from the replicates' spread).
    Self-normalised weights add an O(1/ESS) bias, below 1% here."""
    est_mean, est_var = _moments(post)
    b = est_mean.shape[0]
    for name, est, exact in (("mean", est_mean, mean), ("variance", est_var, var)):
        se = est.std() / math.sqrt(b)
        assert abs(est.mean() - exact) < z * se + 1e-3 * abs(exact), (name, est.mean(), exact, se)
        assert se < 0.05 * math.sqrt(var), (name, se)  # the check is not vacuous


class FixedProposal(InferenceEngine):
    """An 'amortised' engine whose posterior is a fixed tanh-Gaussian, wider than the
    target and off-centre, so that only correct p/q weights recover the posterior."""

    def __init__(self, loc=0.3, scale=0.9):
        super().__init__()
        self.loc, self.scale = loc, scale
        self.bias = torch.nn.Parameter(torch.zeros(()))

    def infer(self, s, objective=None):
        shape = (s.shape[0], self.act_dim)
        loc = torch.full(shape, self.loc, dtype=s.dtype) + 0.0 * self.bias
        return TanhGaussian(loc, torch.full(shape, math.log(self.scale), dtype=s.dtype))

    def loss(self, s, objective):
        posterior = self.infer(s)
        j, metrics = objective(posterior, 4)
        return -j.mean(), {**metrics, "loc": posterior.loc.detach(),
                           "log_scale": posterior.log_scale.detach()}  # fmt: skip
