"""A prior written as a plain Pyro program: two gaits, and planning under it.

A prior program takes states ``s`` [B, 1 or N, S] and samples the action at a site
named ``"a"`` whose batch shape broadcasts to [B, N] (the optimality model's
``states`` and ``particles`` plates) and whose event shape is [A], with support inside
[-1, 1]^A.  Here the action is tanh of a two-component Gaussian mixture: two gaits
whose joints move in antiphase.  The mixture is marginalised inside the site
(``MixtureSameFamily``), so the site's log-prob is the exact prior density that the
KL of Eq. 6-7 needs.

The script (a) evaluates a Direct engine's ELBO under this prior (Eq. 16, H = 0)
and (b) plans with self-normalised importance sampling (Eq. 11): prior samples
weighted by exp(Q̂/α), here with a Q̂ that prefers the first gait.

    python examples/mixture_prior.py
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch.distributions.transforms import TanhTransform

from mbvi.planners import Direct
from mbvi.pyro import OptimalityModel, importance_plan


def make_two_gait_prior(act_dim: int, offset: float = 1.0, scale: float = 0.3):
    """p(a) = tanh(½ N(+m, σ²) + ½ N(−m, σ²)), m = ``offset`` · (+1, −1, +1, ...).

    Args:
        act_dim: A, the action dimension.
        offset: distance of each gait's pre-tanh mean from 0.
        scale: pre-tanh standard deviation of each gait.
    """
    pattern = torch.tensor([(-1.0) ** i for i in range(act_dim)])
    gaits = torch.stack([offset * pattern, -offset * pattern])  # [2, A]

    def two_gait_prior(s: torch.Tensor) -> torch.Tensor:
        locs = gaits.to(s)
        which = dist.Categorical(logits=torch.zeros(2, dtype=s.dtype, device=s.device))
        each = dist.Normal(locs, scale * torch.ones_like(locs)).to_event(1)
        u = dist.MixtureSameFamily(which, each)
        return pyro.sample("a", dist.TransformedDistribution(u, [TanhTransform(cache_size=1)]))

    two_gait_prior.gaits = torch.tanh(gaits)  # the two gaits' actions, for inspection
    return two_gait_prior


def prefers_first_gait(gait: torch.Tensor):
    """Q̂(s, a) = −‖a − gait‖², a ValueFn value(s [B,S], a [B,N,A]) -> [B,N]."""

    def value(s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return -(a - gait).square().sum(-1)

    return value


def main(obs_dim: int = 3, act_dim: int = 4, n_states: int = 2, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    prior = make_two_gait_prior(act_dim)
    value = prefers_first_gait(prior.gaits[0])
    model = OptimalityModel(prior, value, alpha=0.1, n_particles=256, act_dim=act_dim)
    states = torch.randn(n_states, obs_dim)

    # (a) any engine's posterior is a guide; α·ELBO = Σ_b J̃(s_b) under the mixture prior.
    engine = Direct(hidden=(32,))
    engine.build(obs_dim, act_dim)
    elbo = model.elbo(model.guide(engine.infer(states)), states)

    # (b) plan: prior particles weighted by exp(Q̂/α) (Eq. 11).
    plan = importance_plan(model, states)
    best = plan.best_action()
    return {
        "elbo_times_alpha": elbo.item(),
        "best_action": best,
        "distance_to_first_gait": (best - prior.gaits[0]).norm(dim=-1),
        "ess": plan.ess(),
    }


if __name__ == "__main__":
    for key, val in main().items():
        print(f"{key}: {val}")
