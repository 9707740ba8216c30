"""The losses of one EM update (paper Algorithm 1, the M-step) as one function.

``VariationalAgent.update`` minimises their sum in one backward pass; with
``compile=True`` the agent runs this function through ``torch.compile``.
"""

from __future__ import annotations

from functools import partial

import torch

from mbvi.errors import ConfigError
from mbvi.planners.base import InferenceEngine
from mbvi.variational.distributions import TanhGaussian
from mbvi.variational.objectives import TrajectoryObjective, alpha_loss, soft_td_target
from mbvi.variational.priors import Prior
from mbvi.variational.values import ValueEstimate


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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(the summed loss, detached metrics) of one update on a replay batch ``s`` [B,S],
    ``a`` [B,A], ``r`` [B], ``s2``, ``term``.

    The value, engine, α and prior losses touch disjoint parameters (the engine sees
    the value with frozen parameters; targets and KL are constants), so minimising
    their sum gives each part exactly its own gradient.  The engine thus sees the value
    before, not after, this step's value update.
    """
    alpha = log_alpha.detach().exp()

    # Value: soft TD target with the posterior at s' (Eq. 9-10), target critics.
    with torch.no_grad():  # engines that need ∇λJ̃ enable gradients for themselves
        next_objective = TrajectoryObjective(s2, value.target, prior, alpha)
        next_v, _ = next_objective(engine.td_posterior(s2, next_objective), 1)
        y = soft_td_target(r, term, next_v, gamma)
    value_loss, value_metrics = value.loss(s, a, y)

    # Engine: maximise J̃ (Eq. 16) against the value with its parameters frozen.
    objective = TrajectoryObjective(s, partial(value, frozen=True), prior, alpha)
    engine_loss, engine_metrics = engine.loss(s, objective)

    # The engine's metrics carry KL(π‖p) [B] and, for a learned prior, the posterior
    # its loss was about.
    missing = [k for k in ("kl", "loc", "log_scale") if k not in engine_metrics]
    if "kl" in missing or (prior.learnable and missing):
        raise ConfigError(
            f"{type(engine).__name__}.loss returned no {missing[0]!r} metric, which the "
            f"agent needs (metrics given: {sorted(engine_metrics)}). An engine's loss "
            "metrics must hold 'kl' [B] for tuning α and, with a learned prior, 'loc' "
            "and 'log_scale' [B,A] of its posterior: add "
            "mbvi.planners.base.posterior_metrics(posterior) to them."
        )
    kl = engine_metrics["kl"]

    # Prior (learned priors only): fit p_θ to that posterior (Eq. 7), without
    # inferring it again.
    prior_loss, prior_metrics = 0.0, {}
    if prior.learnable:
        posterior = TanhGaussian(engine_metrics["loc"], engine_metrics["log_scale"])
        prior_loss, prior_metrics = prior.loss(s, posterior)

    # Temperature: keep KL(π‖p) at its target.
    a_loss = alpha_loss(log_alpha, kl, kl_target)

    return value_loss + engine_loss + a_loss + prior_loss, {
        # Scalar engine diagnostics, e.g. J̃ per inference iteration (Fig. 2).
        **{f"engine/{k}": v for k, v in engine_metrics.items() if v.dim() == 0},
        **{f"prior/{k}": v for k, v in prior_metrics.items() if v.dim() == 0},
        "loss/value": value_loss.detach(),
        "loss/engine": engine_loss.detach(),
        "train/alpha": alpha,
        "train/kl": kl.mean(),
        "train/q": value_metrics["q_mean"],
    }
