"""A closed-form test objective for the gradient-based engines.

Q̂(s, a) = −c/2 ‖atanh(a) − m‖² with a hidden target m [B,A] per state, and the prior
tanh(N(0, 1)).  With u = atanh(a) ~ N(μ, σ²) Eq. 16 is exact:

    J̃(μ, σ) = −c/2 (‖μ − m‖² + Σσ²) − α KL(N(μ, σ²) ‖ N(0, 1)),

maximised by μ* = c m / (c + α), σ*² = α / (c + α) (the Gaussian Boltzmann posterior).
m is drawn independently of the states, so only an engine that reads ∇λ J̃ can find μ*.
"""

from __future__ import annotations

import math

import torch

from mbvi.variational.distributions import atanh
from mbvi.variational.objectives import TrajectoryObjective
from mbvi.variational.priors import ConstantTanhGaussianPrior

C, ALPHA = 1.0, 1.0


def make_objective(
    b: int, obs_dim: int, act_dim: int, dtype=torch.float32
) -> tuple[TrajectoryObjective, torch.Tensor]:
    """(TrajectoryObjective over random states [b,S], hidden targets m [b,A] in [-2, 2])."""
    s = torch.randn(b, obs_dim, dtype=dtype)
    m = torch.rand(b, act_dim, dtype=dtype) * 4.0 - 2.0
    prior = ConstantTanhGaussianPrior()
    prior.build(obs_dim, act_dim)
    prior.to(dtype)

    def value(states: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        # m of each given state, looked up by identity: Q̂ is a function of (s, a), so
        # engines may evaluate it on any subset of the states.
        rows = (states.unsqueeze(1) == s.unsqueeze(0)).all(-1).float().argmax(1)
        return -0.5 * C * (atanh(a) - m[rows].unsqueeze(-2)).pow(2).sum(-1)

    return TrajectoryObjective(s, value, prior, ALPHA), m


def optimum(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ*, log σ*), each [B,A]."""
    var = ALPHA / (C + ALPHA)
    return C * m / (C + ALPHA), torch.full_like(m, 0.5 * math.log(var))


def exact_j(m: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """J̃ [B] in closed form."""
    var = (2.0 * log_scale).exp()
    expected_q = -0.5 * C * ((loc - m).pow(2) + var).sum(-1)
    kl = 0.5 * (var + loc.pow(2) - 1.0 - 2.0 * log_scale).sum(-1)
    return expected_q - ALPHA * kl
