"""Prior programs written as Pyro users write them: latent sites, learnable parameters,
a prior on [-1, 1] that is not squashed by tanh.

``mbvi.pyro.ProgramPrior`` takes each of these by its import path (run from the
repository root, or put your module on PYTHONPATH)::

    mbvi fit --config configs/pendulum/sac.yaml --model.prior mbvi.pyro.ProgramPrior \\
        --model.prior.init_args.program examples.latent_prior.gait_prior

* ``gait_prior``: a gait is chosen at a latent site, then the action given the gait.
  mbvi sums the gait out exactly (Pyro's enumeration): the density is that of
  ``examples.mixture_prior.two_gait_prior``, which marginalises by hand.
* ``make_wobble_prior``: a continuous latent offset; log p(a|s) is then an
  importance-weighted estimate (``ProgramPrior.latent_samples`` draws).
* ``make_beta_prior``: Beta(c, c) mapped to [-1, 1] by AffineTransform(-1, 2).
* ``make_learnable_gait_prior`` (``pyro.param``) and ``GaitModule`` (a ``PyroModule``):
  learnable programs, fitted in the M-step like ``mbvi.LearnedPrior``::

    --model.prior.init_args.program examples.latent_prior.GaitModule \\
    --model.prior.init_args.factory true

Each program takes states ``s`` [B, 1 or N, S] inside the ``states`` and ``particles``
plates and samples the action at site ``"a"`` with event shape [A].
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam
from torch import nn
from torch.distributions import constraints
from torch.distributions.transforms import AffineTransform, TanhTransform


def _antiphase(act_dim: int, offset: float) -> torch.Tensor:
    """The two gaits' pre-tanh means [2, A]: ±offset · (+1, −1, +1, ...)."""
    pattern = torch.tensor([(-1.0) ** i for i in range(act_dim)])
    return torch.stack([offset * pattern, -offset * pattern])


def _tanh_normal(loc: torch.Tensor, scale) -> dist.TransformedDistribution:
    base = dist.Normal(loc, scale).to_event(1)
    return dist.TransformedDistribution(base, [TanhTransform(cache_size=1)])


def make_gait_prior(act_dim: int, offset: float = 1.0, scale: float = 0.3):
    """gait ~ Categorical(½, ½); a = tanh(u), u ~ N(gait's mean, scale²) per dim.

    Args:
        act_dim: A.
        offset: distance of each gait's pre-tanh mean from 0.
        scale: pre-tanh standard deviation within a gait.
    """
    gaits = _antiphase(act_dim, offset)

    def gait_prior(s: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(2, dtype=s.dtype, device=s.device)
        gait = pyro.sample("gait", dist.Categorical(logits=logits))
        return pyro.sample("a", _tanh_normal(gaits.to(s)[gait], scale))

    return gait_prior


gait_prior = make_gait_prior(act_dim=1)
"""The latent-gait prior for one-dimensional actions (Pendulum-v1)."""


def make_wobble_prior(act_dim: int, spread: float = 0.5, scale: float = 0.3):
    """z ~ N(0, spread²) per dim (a latent offset), a = tanh(u), u ~ N(z, scale²).

    Marginally u ~ N(0, spread² + scale²): a closed form the importance-weighted
    estimate of log p(a|s) can be checked against.
    """

    def wobble_prior(s: torch.Tensor) -> torch.Tensor:
        zeros = torch.zeros(act_dim, dtype=s.dtype, device=s.device)
        z = pyro.sample("z", dist.Normal(zeros, spread).to_event(1))
        return pyro.sample("a", _tanh_normal(z, scale))

    return wobble_prior


def make_beta_prior(act_dim: int, concentration: float = 2.0):
    """a = 2x − 1, x ~ Beta(c, c) per dim: on [-1, 1], though torch reports the affine
    map's codomain ``Real`` as its support."""

    def beta_prior(s: torch.Tensor) -> torch.Tensor:
        c = torch.full((act_dim,), concentration, dtype=s.dtype, device=s.device)
        x = dist.Beta(c, c).to_event(1)
        return pyro.sample("a", dist.TransformedDistribution(x, [AffineTransform(-1.0, 2.0)]))

    return beta_prior


def make_learnable_gait_prior(act_dim: int, offset: float = 1.0, scale: float = 0.3):
    """``make_gait_prior`` with learnable gait weights, means and scale (``pyro.param``)."""
    gaits = _antiphase(act_dim, offset)

    def learnable_gait_prior(s: torch.Tensor) -> torch.Tensor:
        logits = pyro.param("gait_logits", torch.zeros(2))
        locs = pyro.param("gait_locs", gaits)
        sigma = pyro.param("gait_scale", torch.tensor(scale), constraint=constraints.positive)
        gait = pyro.sample("gait", dist.Categorical(logits=logits.to(s)))
        return pyro.sample("a", _tanh_normal(locs.to(s)[gait], sigma.to(s)))

    return learnable_gait_prior


class GaitModule(PyroModule):
    """The learnable gait prior as a ``PyroModule`` whose gait weights depend on the
    state through a linear layer: p(gait|s) = softmax(W s + b).

    Args:
        act_dim: A.
        obs_dim: S (Pendulum-v1's 3 by default; pass it in ``factory_args`` for others).
        offset: initial distance of each gait's pre-tanh mean from 0.
        scale: initial pre-tanh standard deviation within a gait.
    """

    def __init__(self, act_dim: int, obs_dim: int = 3, offset: float = 1.0, scale: float = 0.3):
        super().__init__()
        self.gate = nn.Linear(obs_dim, 2)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)
        self.locs = nn.Parameter(_antiphase(act_dim, offset))
        self.scale = PyroParam(torch.tensor(scale), constraint=constraints.positive)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        gait = pyro.sample("gait", dist.Categorical(logits=self.gate(s)))
        return pyro.sample("a", _tanh_normal(self.locs[gait], self.scale))
