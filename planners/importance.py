"""Self-normalised importance sampling of the Boltzmann posterior (paper Eq. 11)."""

from __future__ import annotations

import torch

from mbvi.planners._gradient_tools import check_count
from mbvi.planners._sampling import ProposalEngine, check_mode, propose
from mbvi.planners.base import InferenceEngine
from mbvi.variational.objectives import TrajectoryObjective
from mbvi.variational.particles import WeightedParticles


class ImportanceSampling(ProposalEngine):
    """π(a|s,O) ∝ p_θ(a|s) exp(Q̂(s,a)/α)  (Eq. 11, H = 0 of the trajectory posterior)
    by self-normalised importance sampling::

        a_k ~ q(·|s),  k = 1..K            q = p_θ, or the proposal engine's posterior
        log w_k = Q̂(s,a_k)/α + log p_θ(a_k|s) − log q(a_k|s)
        w ← w / Σ_k w_k                     (a state whose weights all vanish falls back
                                             to uniform weights: ``collapsed``)

    Q̂ is whatever value the objective holds (a critic, or a model-based H-step
    return).  The particles keep log q, so ``kl`` has an estimate.

    Args:
        n_particles: K actions per state.
        proposal: an engine whose posterior proposes the actions (e.g. ``Direct``,
            SAC's policy, trained through this engine's ``loss``); None proposes from
            the prior, so the weights are exp(Q̂/α) alone.
        mode: ``mean`` (weighted mean) or ``best`` (heaviest particle) for
            ``mean_action``.
    """

    def __init__(
        self,
        n_particles: int = 256,
        proposal: InferenceEngine | None = None,
        mode: str = "mean",
    ):
        super().__init__()
        check_count("ImportanceSampling", "n_particles", n_particles)
        check_mode("ImportanceSampling", mode)
        self.n_particles, self.mode = n_particles, mode
        self._set_proposal(proposal)

    def infer(self, s: torch.Tensor, objective: TrajectoryObjective) -> WeightedParticles:
        self.check_states(s, self.obs_dim)
        with torch.no_grad():
            posterior = self.proposal_posterior(s, objective)
            draw = propose(objective.prior, s, self.n_particles, posterior)
            log_w = objective.value(s, draw.a) / objective.alpha + (draw.log_p - draw.log_q)
        return WeightedParticles(draw.a, log_w, draw.log_q, draw.u, self.mode)
