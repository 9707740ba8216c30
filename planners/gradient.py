"""Non-amortised inference: per-state gradient ascent on J̃ (paper §2, Eq. 16).

The reference for the amortisation gap (Cremer et al., 2018): what an amortised engine
(Direct, Iterative) would reach if inference were run to convergence in every state.
"""

from __future__ import annotations

import torch

from mbvi.errors import ConfigError
from mbvi.planners._gradient_tools import (
    check_count,
    check_init_options,
    check_prior,
    initial_params,
    objective_gradient,
)
from mbvi.planners.base import InferenceEngine, posterior_metrics
from mbvi.variational.distributions import LOG_SCALE_MAX, LOG_SCALE_MIN, TanhGaussian
from mbvi.variational.objectives import TrajectoryObjective
from mbvi.variational.priors import Prior


class GradientRefinement(InferenceEngine):
    """λ* = argmax_λ J̃(s, λ) for each state by Adam ascent on λ = (μ_u, log σ_u)::

        λ_0 = init, or the prior's tanh-Gaussian parameters, or init_loc / init_log_scale
        for t = 1..steps:   λ ← Adam(λ, ∇λ J̃(s, λ))     (Eq. 16, n_samples actions)

    with Adam's step size decaying linearly from ``lr`` to 0 over the steps.

    Adam acts elementwise and J̃ sums over states, so every state is optimised
    independently.  Only λ is differentiated (``torch.autograd.grad``): the value
    estimate's parameters and their ``.grad`` are never touched.

    Args:
        steps: Adam steps per call.
        lr: Adam's initial learning rate on (loc, log_scale), decayed linearly to 0.
        n_samples: reparameterised actions per state for each gradient estimate.
        init_loc: pre-tanh mean to start from; None takes the prior's.  Required when
            the prior is not a tanh-Gaussian (e.g. ``UniformPrior``).
        init_log_scale: pre-tanh log standard deviation to start from; None takes the
            prior's.  Required when the prior is not a tanh-Gaussian.
    """

    amortised = False

    def __init__(
        self,
        steps: int = 100,
        lr: float = 0.05,
        n_samples: int = 64,
        init_loc: float | None = None,
        init_log_scale: float | None = None,
    ):
        super().__init__()
        check_count("GradientRefinement", "steps", steps)
        check_count("GradientRefinement", "n_samples", n_samples)
        if not lr > 0:
            raise ConfigError(f"GradientRefinement: lr must be > 0, got {lr}")
        check_init_options("GradientRefinement", init_loc, init_log_scale)
        self.steps, self.lr, self.n_samples = steps, lr, n_samples
        self.init_loc, self.init_log_scale = init_loc, init_log_scale

    def check_prior(self, prior: Prior) -> None:
        """Raise ConfigError if inference cannot start from ``prior`` (a built prior)."""
        check_prior("GradientRefinement", prior, self.init_loc, self.init_log_scale)

    def refine(
        self, s: torch.Tensor, objective: TrajectoryObjective, init: TanhGaussian | None = None
    ) -> TanhGaussian:
        """Run ``steps`` Adam steps from ``init`` (``[B,A]``, e.g. an amortised
        engine's posterior, to measure its amortisation gap) or, when None, from the
        prior / configured parameters.  Returns a detached posterior ``[B,A]``."""
        self.check_states(s, self.obs_dim)
        if init is None:
            loc, log_scale = initial_params(
                "GradientRefinement", s, objective, self.act_dim, self.init_loc,
                self.init_log_scale,
            )  # fmt: skip
        else:
            if init.loc.shape != (s.shape[0], self.act_dim):
                raise ValueError(
                    f"GradientRefinement: init must be [{s.shape[0]}, {self.act_dim}], "
                    f"got {tuple(init.loc.shape)}"
                )
            loc, log_scale = init.loc.detach().clone(), init.log_scale.detach().clone()
        opt = torch.optim.Adam([loc, log_scale], lr=self.lr, maximize=True)
        for t in range(self.steps):
            # The step size decays linearly to 0: with a constant one, Adam's normalised
            # steps keep λ wandering around the optimum on noisy gradients, and a
            # refinement started at a good estimate could end below it (a gap < 0).
            opt.param_groups[0]["lr"] = self.lr * (1.0 - t / self.steps)
            _, loc.grad, log_scale.grad = objective_gradient(
                objective, loc, log_scale, self.n_samples
            )
            opt.step()
            with torch.no_grad():
                log_scale.clamp_(LOG_SCALE_MIN, LOG_SCALE_MAX)
        return TanhGaussian(loc.detach(), log_scale.detach())

    def infer(self, s: torch.Tensor, objective: TrajectoryObjective) -> TanhGaussian:
        """``refine`` from the prior / configured parameters."""
        return self.refine(s, objective)

    def loss(
        self, s: torch.Tensor, objective: TrajectoryObjective
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Nothing to train: a zero loss, plus the metrics of the refined posterior
        (``kl`` [B], ``q`` [B], ``loc`` and ``log_scale`` [B,A], detached) so that an
        agent can still tune α and fit a learned prior."""
        posterior = self.infer(s, objective)
        with torch.no_grad():
            j, metrics = objective(posterior, self.n_samples)
        metrics = {**metrics, **posterior_metrics(posterior), "j": j.mean()}
        return torch.zeros((), dtype=s.dtype, device=s.device), metrics
