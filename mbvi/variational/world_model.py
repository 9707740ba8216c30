"""The world-model contract (DESIGN §3): one transition for a batch of states and
actions, with an ensemble dimension.

Shapes: M rows (any batch, e.g. B states × N particles flattened), S state dims,
A action dims, E ensemble members.

    model.build(obs_dim, act_dim)
    pred = model.predict(s, a)                      # per member: [E,M,S], [E,M]
    step = model.step(s, a, propagation="ts1")      # one sampled transition: [M,S], [M]
    loss, metrics = model.loss(s, a, r, s2, term)   # what training minimises

What the fitting loop (``mbvi.models.DynamicsModule``, the agent's refit) calls on a
trainable model, with defaults here for a model that needs none of it:

    model.fit_normalisers(s, a, r, s2)              # data statistics (default: none)
    nll, mse = model.holdout_scores(s, a, r, s2)    # per member, [E] each
    model.set_elites(idx)                           # the members step uses (default: all)

Implementations: ``mbvi.models.DynamicsEnsemble`` (learned Gaussian ensemble), a user's
Pyro program, and the true simulator (not differentiable).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from mbvi.errors import ConfigError

Propagation = Literal["ts1", "mean", "expectation"]
"""How a particle moves through the ensemble (PETS's names):

- ``ts1``: every step, each row goes through one member drawn at random, and its next
  state is sampled from that member's Gaussian (trajectory sampling, TS-1);
- ``mean``: each row goes through one random member, next state = that member's mean;
- ``expectation``: the members' mean prediction, no sampling (deterministic).
"""

PROPAGATIONS = ("ts1", "mean", "expectation")


@dataclass
class Prediction:
    """Every member's prediction for M rows.

    Attributes:
        next_mean: mean of s' per member, ``[E,M,S]`` (already de-normalised, in state
            units: s + Δs).
        next_std: standard deviation of s' per member, ``[E,M,S]``.
        reward_mean: mean reward per member, ``[E,M]``.
        reward_std: reward standard deviation per member, ``[E,M]``.
    """

    next_mean: torch.Tensor
    next_std: torch.Tensor
    reward_mean: torch.Tensor
    reward_std: torch.Tensor


@dataclass
class Step:
    """One transition for M rows: ``next_state`` [M,S], ``reward`` [M] and
    ``terminated`` [M] (a float in {0, 1}, or a probability for a learned head)."""

    next_state: torch.Tensor
    reward: torch.Tensor
    terminated: torch.Tensor


class WorldModel(nn.Module):
    """Base class of world models p(s', r, d | s, a).

    Attributes:
        members: E, the ensemble size (1 for a single model).
        elites: members that ``step`` draws from (all of them unless a fit chooses).
        differentiable: whether ``step`` is differentiable in the actions (False for
            the true simulator); gradient engines refuse a model that is not.
        trainable: whether the agent refits it to replay data (False for the true
            simulator).
    """

    members: int = 1
    elites: int = 1
    differentiable: bool = True
    trainable: bool = True
    obs_dim: int
    act_dim: int

    def build(self, obs_dim: int, act_dim: int, termination: nn.Module | None = None) -> None:
        """Create parameters for the environment's sizes.  ``termination(s, a, s')
        -> [M]`` is the env's termination rule (None: never), passed by
        ``ModelBasedValue``; a model that predicts termination itself may ignore it."""
        self.obs_dim, self.act_dim = obs_dim, act_dim

    def step(
        self,
        s: torch.Tensor,
        a: torch.Tensor,
        propagation: Propagation = "ts1",
        generator: torch.Generator | None = None,
    ) -> Step:
        """One transition of states ``s`` [M,S] under actions ``a`` [M,A] in [-1,1]^A
        (see ``Propagation``); reparameterised, so gradients reach ``a``."""
        raise NotImplementedError

    def forward(
        self,
        s: torch.Tensor,
        a: torch.Tensor,
        propagation: Propagation = "ts1",
        generator: torch.Generator | None = None,
    ) -> Step:
        """``step``: so that ``torch.func.functional_call`` can run the model with
        detached parameters (``mbvi.variational.rollouts.frozen``)."""
        return self.step(s, a, propagation, generator)

    def predict(self, s: torch.Tensor, a: torch.Tensor) -> Prediction:
        """Every member's Gaussian over (s', r) for ``s`` [M,S], ``a`` [M,A]."""
        raise NotImplementedError(f"{type(self).__name__} gives no per-member prediction")

    def loss(
        self,
        s: torch.Tensor,
        a: torch.Tensor,
        r: torch.Tensor,
        s2: torch.Tensor,
        term: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss on a batch of real transitions ``s`` [E,M,S] or [M,S],
        ``a``, ``r``, ``s2``, ``term``, and detached metrics."""
        raise NotImplementedError(f"{type(self).__name__} is not trained")

    @property
    def built(self) -> bool:
        """Whether ``build`` has run (a fit needs the parameters it creates)."""
        return hasattr(self, "obs_dim")

    def fit_normalisers(self, s, a, r, s2) -> None:
        """Fit whatever statistics of the training transitions the model keeps, before
        a fit; a model that normalises nothing keeps nothing."""

    def holdout_scores(self, s, a, r, s2) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-member NLL and squared error of the mean on held-out rows ``s`` [M,S],
        ``a``, ``r`` [M], ``s2``: two ``[E]`` tensors.  The fit stops early on the mean
        NLL and chooses elites by the squared error."""
        raise NotImplementedError(f"{type(self).__name__} is not trained")

    def set_elites(self, idx) -> None:
        """Make members ``idx`` the ones ``step`` uses.  A model whose ``step`` draws
        from all its members (e.g. a single model) has nothing to choose."""


def check_propagation(propagation: str) -> None:
    """ConfigError unless ``propagation`` is one of ``PROPAGATIONS``."""
    if propagation not in PROPAGATIONS:
        raise ConfigError(
            f"propagation must be one of {', '.join(PROPAGATIONS)}, got {propagation!r}"
        )
