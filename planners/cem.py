"""The cross-entropy method over action sequences (CEM: Rubinstein, 1999; as in PETS,
Chua et al., 2018), with the trajectory objective as its score."""

from __future__ import annotations

import torch

from mbvi.errors import ConfigError
from mbvi.planners._sampling import (
    SequencePlanner,
    World,
    check_mode,
    check_sequence_options,
    sequence_returns,
)
from mbvi.planners.base import InferenceEngine
from mbvi.variational.objectives import TrajectoryObjective
from mbvi.variational.particles import WeightedParticles, take_particles
from mbvi.variational.world_model import WorldModel


class CEM(SequencePlanner):
    """Refit a diagonal Gaussian over sequences to the best of its samples::

        μ ← plan state mean [B,H,A] (pre-tanh; the previous plan shifted),  σ ← init_std
        for i = 1..iterations:
            u_k = μ + σ ε_k,  k = 1..K                             [B,K,H,A]
            R_k = sequence_returns(tanh u_k)   (G + α Σ_t log p_θ(a_t|s_t))
            E = the ``elites`` sequences of highest R
            μ ← m μ + (1 − m) mean_E(u),  σ ← m σ + (1 − m) std_E(u)
        return the elites' first actions, equally weighted

    CEM seeks the mode of the trajectory posterior (the best sequence), not the
    posterior itself; a state whose scores are all non-finite is ``collapsed``.

    Args:
        population: K sequences sampled per iteration.
        elites: how many best sequences refit the Gaussian, in [1, population].
        iterations: refits per call.
        horizon: H >= 1 planned actions (H − 1 model steps, the leaf value at the end).
        init_std: σ at the start of every call, in pre-tanh units.
        momentum: m in [0, 1), the weight of the old μ, σ in each refit (PETS's α).
        proposal: an amortised engine the agent trains alongside through ``loss``
            and whose posterior serves the TD target; the plan does not read it.
        model: a world model to plan through instead of the value's, built by this
            engine's ``build``; needed when the value is model-free and H > 1.
        gamma: γ when the value is not a bound ``ModelBasedValue``.
        mode: ``mean`` (mean of the elites' first actions) or ``best``.
    """

    def __init__(
        self,
        population: int = 256,
        elites: int = 32,
        iterations: int = 5,
        horizon: int = 5,
        init_std: float = 0.5,
        momentum: float = 0.1,
        proposal: InferenceEngine | None = None,
        model: WorldModel | None = None,
        gamma: float = 0.99,
        mode: str = "mean",
    ):
        super().__init__()
        check_sequence_options("CEM", population, iterations, horizon, init_std, gamma)
        if not 1 <= elites <= population:
            raise ConfigError(f"CEM: elites must lie in [1, population={population}], got {elites}")
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"CEM: momentum must lie in [0, 1), got {momentum}")
        check_mode("CEM", mode)
        self.population, self.elites, self.iterations = population, elites, iterations
        self.horizon, self.init_std, self.momentum = horizon, init_std, momentum
        self.model, self.gamma, self.mode = model, gamma, mode
        self._set_proposal(proposal)

    def _optimise(
        self, objective: TrajectoryObjective, world: World, mean: torch.Tensor
    ) -> tuple[WeightedParticles, torch.Tensor]:
        std, m = torch.full_like(mean, self.init_std), self.momentum
        for _ in range(self.iterations):
            u = self.sample_sequences(mean, std)
            scores = sequence_returns(objective, world, torch.tanh(u), u)
            scores = scores.nan_to_num(nan=-torch.inf, neginf=-torch.inf)
            collapsed = torch.isneginf(scores).all(-1)
            elite = take_particles(u, scores.topk(self.elites, -1).indices)  # [B,E,H,A]
            mean = m * mean + (1.0 - m) * elite.mean(1)
            std = m * std + (1.0 - m) * elite.std(1, unbiased=False)
        first = elite[:, :, 0]
        log_w = first.new_zeros(first.shape[:2])
        return WeightedParticles(torch.tanh(first), log_w, None, first, self.mode, collapsed), mean
