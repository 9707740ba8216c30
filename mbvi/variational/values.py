"""Value estimates Q̂(s, a) (paper §3.2 "conditional likelihood").

A value estimate is called as ``value(s [B,S], a [B,N,A], frozen=False) -> [B,N]``;
``frozen=True`` lets gradients reach the actions but not the estimate's parameters,
which is how inference uses it without training the critic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from mbvi._private_torch import polyak_
from mbvi.errors import ConfigError
from mbvi.models.q import QEnsemble


class ValueEstimate(nn.Module):
    """Base class of value estimates: everything the agent's M-step calls.

    Lifecycle: ``build(obs_dim, act_dim, env)`` once; ``bind(...)`` once the agent
    owns a prior, an engine and α; then per update ``forward`` (inference), ``target``
    and ``loss`` (the TD regression), ``update_target`` after the optimiser step, and
    ``update_model`` every ``model_every`` env steps.  Shapes: B states, N actions.
    """

    obs_dim: int
    act_dim: int
    horizon: int = 0
    """H, the model steps inside Q̂ (0 for a model-free critic)."""
    synthetic_ratio: float = 0.0
    """Share of each update's batch drawn from model-generated transitions."""
    model_seed: int = 0
    """Seeds ``update_model``'s own random draws (a world model's bootstrap resamples and
    hold-out split); the agent sets it to the run's seed before ``build``."""

    def build(self, obs_dim: int, act_dim: int, env=None) -> None:
        """Create parameters for the env's sizes; ``env`` (a Gymnasium env, optional)
        lets a model-based estimate read the env's termination rules."""
        self.obs_dim, self.act_dim = obs_dim, act_dim

    def bind(self, prior, policy, alpha, gamma: float) -> None:
        """Hand over what a model-based estimate rolls out with: the prior, a policy
        ``policy(s [M,S], frozen) -> Posterior`` (the engine), a callable returning
        the current α, and γ.  Model-free estimates need none of it."""

    def forward(self, s: torch.Tensor, a: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """Q̂(s, a): states ``s`` [B,S], actions ``a`` [B,N,A] -> [B,N]; with ``frozen``
        gradients reach ``a`` but no parameter of the estimate."""
        raise NotImplementedError

    def target(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Q̂ of the target networks for the TD target, ``[B,N]``; no parameter gets a
        gradient, ``a`` does."""
        raise NotImplementedError

    def loss(
        self, s: torch.Tensor, a: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """TD regression on real transitions: ``s`` [B,S], ``a`` [B,A], target ``y``
        [B] -> (loss, metrics with ``q_mean``)."""
        raise NotImplementedError

    def update_target(self) -> None:
        """Called after every optimiser step (Polyak averaging)."""

    def td_parameters(self) -> list[nn.Parameter]:
        """The parameters ``loss`` trains (the agent's value optimiser holds these)."""
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def world_model(self):
        """The world model inside the estimate, or None (model-free)."""
        return None

    def update_model(self, replay, env_step: int) -> dict[str, float]:
        """Fit the world model to the replay buffer's transitions; returns metrics
        (``model/...``).  Nothing to do for a model-free estimate."""
        return {}


class TwinQ(ValueEstimate):
    """Model-free value: an ensemble of critics with Polyak-averaged target copies.

    Args:
        hidden: widths of each critic's hidden layers.
        members: number of critics (2 is SAC's twin Q).
        reduce: how the critics combine, ``min`` (clipped double Q) or ``mean``.
        tau: Polyak factor of the target update, target ← (1−τ) target + τ online.
    """

    def __init__(
        self,
        hidden: Sequence[int] = (256, 256),
        members: int = 2,
        reduce: Literal["min", "mean"] = "min",
        tau: float = 0.005,
    ):
        super().__init__()
        if reduce not in ("min", "mean"):
            raise ConfigError(f"TwinQ reduce must be 'min' or 'mean', got {reduce!r}")
        if members < 1:
            raise ConfigError(f"TwinQ members must be >= 1 (2 is SAC's twin Q), got {members}")
        if not 0.0 < tau <= 1.0:
            raise ConfigError(f"TwinQ tau must be in (0, 1] (SAC uses 0.005), got {tau}")
        self.hidden, self.members, self.reduce, self.tau = tuple(hidden), members, reduce, tau

    def build(self, obs_dim: int, act_dim: int, env=None) -> None:
        super().build(obs_dim, act_dim)
        self.q = QEnsemble(obs_dim, act_dim, self.hidden, self.members)
        self.q_target = QEnsemble(obs_dim, act_dim, self.hidden, self.members)
        self.q_target.load_state_dict(self.q.state_dict())
        self.q_target.requires_grad_(False)

    def _combine(self, qs: torch.Tensor) -> torch.Tensor:
        return qs.min(0).values if self.reduce == "min" else qs.mean(0)

    def forward(self, s: torch.Tensor, a: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        if frozen:
            return self.q.frozen_reduced(s, a, self.reduce)
        return self._combine(self.q(s, a))

    def target(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Q̂ of the target critics, ``[B,N]``.  Their parameters never receive gradients;
        gradients still reach ``a``, so gradient-based engines can infer against it."""
        return self.q_target.frozen_reduced(s, a, self.reduce)

    def loss(
        self, s: torch.Tensor, a: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Squared TD error of every critic against target ``y`` [B]; ``a`` is [B,A]."""
        qs = self.q(s, a.unsqueeze(1)).squeeze(-1)  # [E, B]
        loss = (qs - y).pow(2).mean(-1).sum() * 0.5
        return loss, {"q_mean": qs.detach().mean()}

    @torch.no_grad()
    def update_target(self) -> None:
        polyak_(self.q_target.parameters(), self.q.parameters(), self.tau)
