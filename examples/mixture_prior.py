"""A prior written as a plain Pyro program: two gaits, and planning under it.

A prior program takes states ``s`` [B, 1 or N, S] (one row per state, or per particle
after a model step) and samples the action at a site named ``"a"`` whose batch shape
broadcasts to [B, N] (the ``states`` and ``particles`` plates it runs in) and whose
event shape is [A], with support inside [-1, 1]^A; it makes its tensors on ``s``'s
device and dtype.  Here the action is tanh of a two-component Gaussian mixture: two
gaits whose joints move in antiphase.  The mixture is marginalised inside the site
(``MixtureSameFamily``), so the site's log-prob is the exact prior density that the
KL of Eq. 6-7 needs.  ``swing_prior`` shows a state-dependent program.

The script (a) evaluates a Direct engine's ELBO under this prior (Eq. 16, H = 0)
and (b) plans with self-normalised importance sampling (Eq. 11): prior samples
weighted by exp(Q̂/α), here with a Q̂ that prefers the first gait.

    python examples/mixture_prior.py

Train an agent with a program as its prior (``mbvi.pyro.ProgramPrior``; run from the
repository root so that ``examples`` is importable, or put your own module on
PYTHONPATH)::

    mbvi fit --config configs/pendulum/program_prior.yaml
    mbvi fit --config configs/pendulum/sac.yaml --model.prior mbvi.pyro.ProgramPrior \
        --model.prior.init_args.program examples.mixture_prior.swing_prior
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


two_gait_prior = make_two_gait_prior(act_dim=1)
"""The two-gait prior for one-dimensional actions (Pendulum-v1): torque near ±tanh(1).
For A > 1 name the factory: ``program: examples.mixture_prior.make_two_gait_prior``
with ``factory: true``."""


def swing_prior(s: torch.Tensor, offset: float = 1.0, scale: float = 0.3) -> torch.Tensor:
    """Pendulum-v1's p(a|s): the two torques ±tanh(``offset``) weighted by
    sigmoid(±2θ̇), so the prior prefers to push along the swing (pumping energy).

    ``s`` [B, 1 or N, 3] = (cos θ, sin θ, θ̇); the site ``a`` has batch shape
    [B, 1 or N] and event shape [1].
    """
    theta_dot = s[..., 2:3]
    which = dist.Categorical(logits=torch.cat([theta_dot, -theta_dot], -1))  # [B, ·, 2]
    locs = torch.tensor([[offset], [-offset]], dtype=s.dtype, device=s.device)
    each = dist.Normal(locs.expand(*theta_dot.shape[:-1], 2, 1), scale).to_event(1)
    u = dist.MixtureSameFamily(which, each)
    return pyro.sample("a", dist.TransformedDistribution(u, [TanhTransform(cache_size=1)]))


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
