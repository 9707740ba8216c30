"""Model predictive path integral control (MPPI: Williams et al., 2017, "Information
Theoretic MPC for Model-Based Reinforcement Learning", Algorithm 2's update) over
action sequences, with the trajectory objective as its score."""

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
from mbvi.variational.particles import WeightedParticles, normalise_log_weights
from mbvi.variational.world_model import WorldModel


class MPPI(SequencePlanner):
    """Importance-weighted averaging of Gaussian perturbations of a plan::

        μ ← plan state mean  [B,H,A] (pre-tanh; the previous plan shifted by one step)
        for i = 1..iterations:
            u_k = μ + σ ε_k,  ε_k ~ N(0, I),  k = 1..K            [B,K,H,A]
            R_k = sequence_returns(tanh u_k)   (G + α Σ_t log p_θ(a_t|s_t))
            w_k ∝ exp(R_k / λ)     (only the ``elites`` best sequences when set)
            μ ← Σ_k w_k u_k
        return the first actions tanh(u_k[0]) with weights w_k

    R/α is the log of the unnormalised trajectory posterior of the actions, so λ = α
    (the default) weighs each sampled sequence by that posterior's density; as MPPI
    does not divide by its Gaussian sampling density, the plan is a smoothed mode of
    the posterior, not a sample of it.  A smaller λ concentrates on the best
    sequences.  σ stays fixed, as in MPPI.

    Args:
        population: K sequences sampled per iteration.
        iterations: update rounds per call.
        temperature: λ > 0 of the weights; None takes the objective's α.
        elites: weigh only this many best sequences per iteration (None: all).
        horizon: H >= 1 planned actions (H − 1 model steps, the leaf value at the end).
        init_std: σ of the perturbations in pre-tanh units.
        proposal: an amortised engine the agent trains alongside through ``loss``
            and whose posterior serves the TD target (``td_posterior``); the plan
            itself does not read it.
        model: a world model to plan through instead of the value's, built by this
            engine's ``build``; needed when the value is model-free and H > 1.
        gamma: γ when the value is not a bound ``ModelBasedValue``.
        mode: ``mean`` (weighted mean first action, MPPI's) or ``best``.
    """

    def __init__(
        self,
        population: int = 256,
        iterations: int = 5,
        temperature: float | None = None,
        elites: int | None = None,
        horizon: int = 5,
        init_std: float = 0.5,
        proposal: InferenceEngine | None = None,
        model: WorldModel | None = None,
        gamma: float = 0.99,
        mode: str = "mean",
    ):
        super().__init__()
        check_sequence_options("MPPI", population, iterations, horizon, init_std, gamma)
        if temperature is not None and not temperature > 0:
            raise ConfigError(
                f"MPPI: temperature must be > 0 (or None for the objective's α), got {temperature}"
            )
        if elites is not None and not 1 <= elites <= population:
            raise ConfigError(
                f"MPPI: elites must lie in [1, population={population}] or be None, got {elites}"
            )
        check_mode("MPPI", mode)
        self.population, self.iterations, self.temperature = population, iterations, temperature
        self.elites, self.horizon, self.init_std = elites, horizon, init_std
        self.model, self.gamma, self.mode = model, gamma, mode
        self._set_proposal(proposal)

    def _optimise(
        self, objective: TrajectoryObjective, world: World, mean: torch.Tensor
    ) -> tuple[WeightedParticles, torch.Tensor]:
        lam = objective.alpha if self.temperature is None else self.temperature
        for _ in range(self.iterations):
            u = self.sample_sequences(mean, self.init_std)
            log_w = sequence_returns(objective, world, torch.tanh(u), u) / lam
            if self.elites is not None:
                ranked = log_w.nan_to_num(nan=-torch.inf, neginf=-torch.inf)
                cut = ranked.topk(self.elites, -1).values[:, -1:]
                log_w = log_w.masked_fill(log_w < cut, -torch.inf)
            log_w, collapsed = normalise_log_weights(log_w)
            mean = (log_w.exp()[..., None, None] * u).sum(1)
        first = u[:, :, 0]
        return WeightedParticles(torch.tanh(first), log_w, None, first, self.mode, collapsed), mean
