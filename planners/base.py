"""The inference-engine interface (DESIGN §3).

An engine performs the E-step: given states and the objective J̃ of Eq. 16 it returns
the approximate posterior π(a|s,O).  It never sees the environment, the replay buffer
or the logger, so any engine can be driven by a closed-form objective in a test::

    engine.build(obs_dim, act_dim)
    objective = TrajectoryObjective(states, value_fn, prior, alpha)
    posterior = engine.infer(states, objective)      # TanhGaussian [B, A]
    loss, metrics = engine.loss(states, objective)   # amortised engines only
"""

from __future__ import annotations

import torch
from torch import nn

from mbvi.variational.distributions import Posterior, TanhGaussian
from mbvi.variational.objectives import TrajectoryObjective


class InferenceEngine(nn.Module):
    """Base class of inference engines.

    Attributes:
        amortised: True when the engine has a network trained through ``loss``.
        state_format: version of what the engine's saved parameters mean.  Raise it
            when a change keeps their shapes but changes how they are read (e.g. a new
            input encoding), so that older checkpoints are refused instead of loading
            into networks that would misread them.
    """

    amortised: bool = True
    state_format: int = 1
    obs_dim: int
    act_dim: int

    def build(self, obs_dim: int, act_dim: int) -> None:
        """Create the engine's networks for the environment's sizes."""
        self.obs_dim, self.act_dim = obs_dim, act_dim

    def check_prior(self, prior) -> None:
        """Raise ``ConfigError`` at configuration time if this engine cannot start from
        ``prior`` (called by the agent once everything is built)."""

    def infer(self, s: torch.Tensor, objective: TrajectoryObjective) -> Posterior:
        """Approximate posterior for states ``s`` [B,S] (a ``Posterior`` over [B, A]:
        a tanh-Gaussian for parametric engines, weighted particles for planners).
        Must work under the caller's ``torch.no_grad`` (the agent acts and builds TD
        targets that way): an engine that differentiates the objective enables
        gradients for itself, as ``_gradient_tools.objective_gradient`` does."""
        raise NotImplementedError

    def td_posterior(self, s: torch.Tensor, objective: TrajectoryObjective) -> Posterior:
        """The posterior at next states that the TD target averages over (Eq. 10).  A
        planner returns its amortised proposal's, so that a TD target never runs a
        full plan per replay state; other engines return ``infer``."""
        return self.infer(s, objective)

    def forward(self, s: torch.Tensor, objective: TrajectoryObjective | None = None) -> Posterior:
        """``td_posterior``: the posterior a model rollout follows for future actions
        (a planner's proposal, never a full plan per imagined step), so that
        ``torch.func.functional_call`` can run it with detached parameters."""
        return self.td_posterior(s, objective)

    def loss(
        self, s: torch.Tensor, objective: TrajectoryObjective
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss whose gradient trains the inference network: −J̃ averaged over states.

        Metrics (detached) include ``kl`` [B] (α is tuned on it) and ``loc`` and
        ``log_scale`` [B,A], the parameters of the posterior the loss is about (a learned
        prior is fitted to it without running inference again; see
        ``posterior_metrics``).
        """
        raise NotImplementedError(f"{type(self).__name__} is not amortised and has no loss")

    @staticmethod
    def check_states(s: torch.Tensor, obs_dim: int) -> None:
        if s.dim() != 2 or s.shape[-1] != obs_dim:
            raise ValueError(f"states must have shape [B, {obs_dim}], got {tuple(s.shape)}")


def posterior_metrics(posterior: TanhGaussian) -> dict[str, torch.Tensor]:
    """``loc`` and ``log_scale`` [B,A] of ``posterior``, detached: the entries of an
    engine's loss metrics that name the posterior it trained."""
    return {"loc": posterior.loc.detach(), "log_scale": posterior.log_scale.detach()}
