"""The losses of one EM update (paper Algorithm 1, the M-step) as one function.

``VariationalAgent.update`` minimises their sum in one backward pass; with
``compile=True`` the agent runs this function through ``torch.compile``.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import torch

from mbvi.errors import ConfigError
from mbvi.planners.base import InferenceEngine
from mbvi.variational.distributions import TanhGaussian
from mbvi.variational.objectives import (
    TrajectoryObjective,
    alpha_loss,
    entropy_alpha_loss,
    soft_td_target,
)
from mbvi.variational.priors import Prior
from mbvi.variational.values import ValueEstimate

AlphaTarget = Literal["kl", "entropy"]
"""What α is tuned towards: ``kl`` keeps KL(π‖p) at a target (``alpha_loss``);
``entropy`` is SAC's procedure, the posterior's entropy at −A (``entropy_alpha_loss``)."""
TDInference = Literal["target", "online"]
"""The critic the TD target's next-state posterior is inferred against; the backup's
values always come from the target critic."""


def check_m_step_options(
    alpha_target: str, td_inference: str, target_kl_per_dim: float | None
) -> None:
    """Raise ConfigError for an unknown ``alpha_target`` or ``td_inference``, or a KL
    target set for the entropy α target (which has no use for it)."""
    if alpha_target not in ("kl", "entropy"):
        raise ConfigError(
            f"alpha_target must be 'kl' (keep KL(π‖p) at target_kl_per_dim per action "
            f"dimension) or 'entropy' (SAC's entropy target −A), got {alpha_target!r}"
        )
    if td_inference not in ("target", "online"):
        raise ConfigError(
            f"td_inference must be 'target' (infer the TD target's next-state posterior "
            f"against the target critic) or 'online' (against the critic that acts), got "
            f"{td_inference!r}"
        )
    if alpha_target == "entropy" and target_kl_per_dim is not None:
        raise ConfigError(
            f"target_kl_per_dim={target_kl_per_dim} sets the KL target of alpha_target='kl', "
            "but alpha_target='entropy' tunes α to SAC's entropy target −A and ignores it; "
            "unset --model.target_kl_per_dim or use --model.alpha_target kl."
        )


def td_target(
    value: ValueEstimate,
    engine: InferenceEngine,
    prior: Prior,
    alpha: torch.Tensor,
    gamma: float,
    r: torch.Tensor,
    s2: torch.Tensor,
    term: torch.Tensor,
    td_inference: TDInference = "target",
) -> torch.Tensor:
    """The soft TD target y = r + γ (1 − d) V(s') [B] (Eq. 9-10) on a replay batch:
    V(s') = J̃(s', π) with one action from the engine's posterior at ``s2`` [B,S] and
    the target critic; the KL term in the prior's ``kl_form``.  The posterior is
    inferred against the target critic (``td_inference='target'``) or against the
    online one that acting uses (``'online'``); the two differ only for engines whose
    inference reads the objective (Iterative, GradientRefinement, planners)."""
    with torch.no_grad():  # engines that need ∇λJ̃ enable gradients for themselves
        next_objective = TrajectoryObjective(s2, value.target, prior, alpha)
        infer_objective = next_objective
        if td_inference == "online":
            infer_objective = TrajectoryObjective(s2, partial(value, frozen=True), prior, alpha)
        next_v, _ = next_objective(engine.td_posterior(s2, infer_objective), 1)
        return soft_td_target(r, term, next_v, gamma)


def m_step_losses(
    value: ValueEstimate,
    engine: InferenceEngine,
    prior: Prior,
    log_alpha: torch.Tensor,
    kl_target: float,
    gamma: float,
    s: torch.Tensor,
    a: torch.Tensor,
    r: torch.Tensor,
    s2: torch.Tensor,
    term: torch.Tensor,
    alpha_target: AlphaTarget = "kl",
    td_inference: TDInference = "target",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(the summed loss, detached metrics) of one update on a replay batch ``s`` [B,S],
    ``a`` [B,A], ``r`` [B], ``s2``, ``term``.  ``kl_target`` is KL(π‖p) summed over
    action dims (used by ``alpha_target='kl'``); ``td_inference`` as in ``td_target``.

    The value, engine, α and prior losses touch disjoint parameters (the engine sees
    the value with frozen parameters; targets and KL are constants), so minimising
    their sum gives each part exactly its own gradient.  The engine thus sees the value
    before, not after, this step's value update.
    """
    alpha = log_alpha.detach().exp()

    # Value: soft TD target with the posterior at s' (Eq. 9-10), target critics.
    y = td_target(value, engine, prior, alpha, gamma, r, s2, term, td_inference)
    value_loss, value_metrics = value.loss(s, a, y)

    # Engine: maximise J̃ (Eq. 16) against the value with its parameters frozen.
    objective = TrajectoryObjective(s, partial(value, frozen=True), prior, alpha)
    engine_loss, engine_metrics = engine.loss(s, objective)

    # The engine's metrics carry KL(π‖p) [B] and, for a learned prior, the posterior
    # its loss was about.
    needed = ("kl", "log_pi") if alpha_target == "entropy" else ("kl",)
    missing = [k for k in (*needed, "loc", "log_scale") if k not in engine_metrics]
    if any(k in missing for k in needed) or (prior.learnable and missing):
        raise ConfigError(
            f"{type(engine).__name__}.loss returned no {missing[0]!r} metric, which the "
            f"agent needs (metrics given: {sorted(engine_metrics)}). An engine's loss "
            "metrics must hold 'kl' [B] for tuning α (and 'log_pi' [B], the mean log π "
            "of its samples, for alpha_target='entropy': pass on TrajectoryObjective's "
            "metrics, or use --model.alpha_target kl) and, with a learned prior, 'loc' "
            "and 'log_scale' [B,A] of its posterior: add "
            "mbvi.planners.base.posterior_metrics(posterior) to them."
        )
    # KL(π‖p) itself, whatever the form the objective reads it in.
    kl = engine_metrics["kl"] - prior.dropped_log_density()

    # Prior (learned priors only): fit p_θ to that posterior (Eq. 7), without
    # inferring it again.
    prior_loss, prior_metrics = 0.0, {}
    if prior.learnable:
        posterior = TanhGaussian(engine_metrics["loc"], engine_metrics["log_scale"])
        prior_loss, prior_metrics = prior.loss(s, posterior)

    # Temperature: keep KL(π‖p), or SAC's entropy, at its target.
    if alpha_target == "entropy":
        a_loss = entropy_alpha_loss(log_alpha, engine_metrics["log_pi"], -float(a.shape[-1]))
    else:
        a_loss = alpha_loss(log_alpha, kl, kl_target)

    return value_loss + engine_loss + a_loss + prior_loss, {
        # Scalar engine diagnostics, e.g. J̃ per inference iteration (Fig. 2).
        **{f"engine/{k}": v for k, v in engine_metrics.items() if v.dim() == 0},
        **{f"prior/{k}": v for k, v in prior_metrics.items() if v.dim() == 0},
        "loss/value": value_loss.detach(),
        "loss/engine": engine_loss.detach(),
        "loss/alpha": a_loss.detach(),
        "train/alpha": alpha,
        "train/kl": kl.mean(),
        "train/q": value_metrics["q_mean"],
    }
