"""A world model as the optimality model's dynamics and reward: Pyro programs that
sample what ``WorldModel.step`` samples (TS-1: a random elite member per particle and
step, then a Gaussian draw), so that α·ELBO and the agent's hot-path objective estimate
the same expectation.

    dynamics, reward = world_model_programs(ensemble)
    model = OptimalityModel(prior, leaf, alpha, horizon=3, dynamics=dynamics,
                            reward_fn=reward)

Guide and model sample the same dynamics sites from the same distributions, so they
add nothing to the ELBO but the randomness of the transitions (Eq. 5).  The reward
enters the ELBO through a factor, linearly, so it is the expected reward under TS-1
(the elites' mean reward), which leaves the expectation of α·ELBO unchanged.  A
model with termination is not covered: the optimality model has no termination.

A ``ProgramDynamics`` is already a Pyro program: its own ``programs()`` are returned,
so the trace holds the user's next-state site (``s_next_t``) rather than a member site.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from mbvi.pyro.dynamics import ProgramDynamics
from mbvi.variational.world_model import WorldModel


def _member(model: WorldModel, site: str, shape: torch.Size, device) -> torch.Tensor:
    """A member index per particle, uniform over the model's elites."""
    elites = getattr(model, "elite_idx", None)
    if elites is None:
        elites = torch.arange(model.members, device=device)
    pick = pyro.sample(site, dist.Categorical(logits=torch.zeros(len(elites), device=device)))
    return elites[pick.expand(shape).reshape(-1)]


def world_model_programs(model: WorldModel):
    """(dynamics, reward_fn) for ``OptimalityModel``: ``dynamics(s [B,N,S], a [B,N,A])
    -> s'``, a Pyro program with a member site and a Gaussian site per step, and
    ``reward_fn(s, a) -> r [B,N]``, the expected reward."""
    if isinstance(model, ProgramDynamics):
        return model.programs()

    def predict(s, a, site):
        b, n = a.shape[:2]
        s = s.expand(b, n, s.shape[-1])
        pred = model.predict(s.reshape(b * n, -1), a.reshape(b * n, -1))
        k = _member(model, site, torch.Size((b, n)), a.device)
        rows = torch.arange(b * n, device=a.device)
        return pred, k, rows, (b, n)

    def dynamics(s, a):
        pred, k, rows, (b, n) = predict(s, a, "member")
        loc = pred.next_mean[k, rows].reshape(b, n, -1)
        scale = pred.next_std[k, rows].reshape(b, n, -1)
        return pyro.sample("s_next", dist.Normal(loc, scale).to_event(1))

    def reward(s, a):
        b, n = a.shape[:2]
        s = s.expand(b, n, s.shape[-1])
        pred = model.predict(s.reshape(b * n, -1), a.reshape(b * n, -1))
        elites = getattr(model, "elite_idx", torch.arange(model.members, device=a.device))
        return pred.reward_mean[elites].mean(0).reshape(b, n)

    return dynamics, reward
