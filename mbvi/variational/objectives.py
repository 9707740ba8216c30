"""The per-state variational objective (Eq. 16) and the losses built on it, as pure
functions of tensors, plus ``TrajectoryObjective``: Eq. 16 closed over one batch of states.

Shapes: B states, N action samples, A action dims.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from mbvi.variational.distributions import TanhGaussian
from mbvi.variational.priors import Prior

ValueFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""value(s [B,S], a [B,N,A]) -> Q̂ [B,N]."""


def soft_objective(q: torch.Tensor, kl: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
    """J̃ = E_π[Q̂] − α KL (Eq. 16): ``q`` [B,N] Monte-Carlo values, ``kl`` [B] -> [B]."""
    return q.mean(-1) - alpha * kl


def soft_td_target(
    reward: torch.Tensor, terminated: torch.Tensor, next_v: torch.Tensor, gamma: float
) -> torch.Tensor:
    """Soft Bellman target r + γ (1 − d) V(s') (Eq. 9), all ``[B]``.

    ``next_v`` is V(s') = E_π[Q̂(s',a')] − α KL (Eq. 10), i.e. J̃ at the next state.
    Only true termination stops bootstrapping: a time-limit truncation is not terminal.
    """
    return reward + gamma * (1.0 - terminated) * next_v


def alpha_loss(log_alpha: torch.Tensor, kl: torch.Tensor, kl_target: float) -> torch.Tensor:
    """Temperature loss log α · (KL* − KL̂): gradient descent raises α while the
    posterior's KL to the prior exceeds the target KL*, and lowers it otherwise.

    With the uniform prior and KL* = A(1 + log 2) this is exactly SAC's entropy-target
    loss −log α · (log π + H*) with H* = −A.  ``kl`` [B] is treated as a constant.
    """
    return (log_alpha * (kl_target - kl.detach())).mean()


class TrajectoryObjective:
    """J̃(s, π) = E_{a~π}[Q̂(s,a)] − α KL(π(·|s,O) ‖ p_θ(·|s))  (Eq. 16) for fixed states.

    Args:
        states: ``[B, S]``.
        value: the value estimate, ``value(s [B,S], a [B,N,A]) -> [B,N]``.
        prior: the action prior; its KL is analytic when it is a tanh-Gaussian, else a
            sample estimate with the same samples as E[Q̂].
        alpha: temperature α > 0 (a detached scalar tensor or float).
    """

    def __init__(self, states: torch.Tensor, value: ValueFn, prior: Prior, alpha):
        self.states, self.value, self.prior, self.alpha = states, value, prior, alpha
        self.prior_dist = prior.distribution(states)
        # Set once a gradient engine has checked that Q̂ is differentiable in actions.
        self._value_differentiable = False

    def subset(self, rows: slice) -> TrajectoryObjective:
        """The same objective restricted to the states ``rows`` (the prior's tanh-Gaussian
        is sliced, not recomputed)."""
        part = copy.copy(self)
        part.states, dist = self.states[rows], self.prior_dist
        if dist is not None:
            part.prior_dist = TanhGaussian(dist.loc[rows], dist.log_scale[rows])
        return part

    def __call__(
        self, posterior: TanhGaussian, n_samples: int, antithetic: bool = False
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """J̃ [B] for a tanh-Gaussian posterior, estimated with ``n_samples``
        reparameterised actions (in ± pairs when ``antithetic``), and metrics
        (``q`` [B], ``kl`` [B], detached)."""
        if self.prior_dist is not None:
            a, _ = posterior.rsample(n_samples, antithetic)
            kl = posterior.kl(self.prior_dist)
        else:
            a, u, log_pi = posterior.rsample_with_log_prob(n_samples, antithetic)
            kl = (log_pi - self.prior.log_prob(self.states, a, u)).mean(-1)
        q = self.value(self.states, a)
        j = soft_objective(q, kl, self.alpha)
        return j, {"q": q.mean(-1).detach(), "kl": kl.detach()}

    def action_values(self, a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Q̂(s,a) + α log p_θ(a|s) for actions [B,N,A]: α times the log of the
        unnormalised Boltzmann posterior of Eq. 11, for non-parametric engines."""
        return self.value(self.states, a) + self.alpha * self.prior.log_prob(self.states, a, u)
