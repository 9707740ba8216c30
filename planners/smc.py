"""Sequential Monte Carlo planning (SMCP: Piché et al., 2019, "Probabilistic Planning
with Sequential Monte Carlo methods", Algorithm 1)."""

from __future__ import annotations

import math

import torch

from mbvi.errors import ConfigError
from mbvi.planners._gradient_tools import check_count
from mbvi.planners._sampling import (
    ProposalEngine,
    World,
    check_gamma,
    check_mode,
    check_resample,
    ess,
    plan_world,
    propose,
    resample,
)
from mbvi.planners.base import InferenceEngine
from mbvi.variational.objectives import TrajectoryObjective
from mbvi.variational.particles import (
    WeightedParticles,
    normalise_log_weights,
    take_particles,
)
from mbvi.variational.world_model import WorldModel


class SMC(ProposalEngine):
    """K trajectory particles through the world model, weighted towards the trajectory
    posterior of the optimality model (Fig. 1a) and resampled as they go::

        p(a_{0:H-1} | s, O) ∝ Π_t p_θ(a_t|s_t) · exp(G/α),
        G = Σ_{t<H-1} γ^t m_t r_t + γ^{H-1} m_{H-1} Q̂(s_{H-1}, a_{H-1})

    SMCP's Algorithm 1 with a critic Q̂ in place of its V (Q̂(s,a) ≈ r + γ V(s'), so
    its h steps are H actions and H−1 model steps here)::

        a_0^k ~ q(·|s);  log w^k = Q̂(s,a_0^k)/α + log p/q(a_0^k)                (t = 0)
        for t = 1..H−1:
            if ESS/K ≤ ess_threshold: resample {trajectories} by w; w ← 1/K   (resample)
            s_t^k, r_{t-1}^k ~ model(s_{t-1}^k, a_{t-1}^k)                 (model step)
            a_t^k ~ q(·|s_t^k)                                                (propose)
            log w^k += [γ^{t-1} m_{t-1} r_{t-1} + γ^t m_t Q̂(s_t,a_t)
                        − γ^{t-1} m_{t-1} Q̂(s_{t-1},a_{t-1})]/α + log p/q(a_t^k)  (reweight)
        return the first actions a_0^k with the final weights w^k

    The bracket is SMCP's exp(A) = exp(r_t + V(s_{t+1}) − V(s_t)) with the temperature
    α: the value telescopes, so after the last step log w is G/α + Σ log p/q, the
    importance weight of the whole trajectory, while at every earlier step Q̂ already
    scores the future the particle has not yet reached.  m_t is the probability that
    no termination came before step t (a terminated particle keeps its weight).
    Acting draws one first action by the final weights (``sample(1)``), as SMCP does.

    The marginal of a_0 is p_θ(a_0|s) E[exp(G/α) | a_0]: with a stochastic model
    this is the soft (optimistic) value, not the mean return inside
    ``ModelBasedValue``'s Q̂.  At H = 1 SMC is importance sampling against the leaf
    value.

    Args:
        n_particles: K trajectories per state.
        horizon: H >= 1 actions per trajectory (H − 1 model steps); the planner's
            horizon replaces a model-based value's own.
        resample: ``systematic`` (lower variance) or ``multinomial``.
        ess_threshold: resample when ESS/K falls to or below it, in (0, 1]; 1
            resamples at every step, as SMCP's Algorithm 1.
        proposal: an engine whose posterior proposes each a_t (e.g. SAC's policy,
            trained through this engine's ``loss``); None proposes from the prior.
        model: a world model to plan through instead of the value's (e.g. the true
            simulator), built by this engine's ``build``; needed when the value is
            model-free and H > 1.
        gamma: γ when the value is not a bound ``ModelBasedValue`` (whose γ is used).
        mode: ``mean`` or ``best`` for ``mean_action``.
        compile: run the particle loop through ``torch.compile`` (one graph per batch
            size, the loop unrolled): the first plan compiles for tens of seconds, later
            plans skip most of eager PyTorch's per-operation overhead, which dominates
            with small models.  Needs a C++ compiler on CPU.
    """

    def __init__(
        self,
        n_particles: int = 256,
        horizon: int = 5,
        resample: str = "systematic",
        ess_threshold: float = 1.0,
        proposal: InferenceEngine | None = None,
        model: WorldModel | None = None,
        gamma: float = 0.99,
        mode: str = "mean",
        compile: bool = False,
    ):
        super().__init__()
        check_count("SMC", "n_particles", n_particles)
        check_count("SMC", "horizon", horizon)
        check_resample("SMC", resample)
        if not 0.0 < ess_threshold <= 1.0:
            raise ConfigError(
                f"SMC: ess_threshold must lie in (0, 1] (resample when ESS/K falls to or "
                f"below it; 1 resamples every step), got {ess_threshold}"
            )
        check_gamma("SMC", gamma)
        check_mode("SMC", mode)
        self.n_particles, self.horizon, self.resample = n_particles, horizon, resample
        self.ess_threshold, self.model, self.gamma, self.mode = ess_threshold, model, gamma, mode
        self._set_proposal(proposal)
        self.compile, self._compiled = compile, None

    def infer(self, s: torch.Tensor, objective: TrajectoryObjective) -> WeightedParticles:
        self.check_states(s, self.obs_dim)
        world = plan_world(objective.value, "SMC", self.horizon, self.model, self.gamma)
        with torch.no_grad():
            return self._plan(s, objective, world)

    def _propose(self, s_t: torch.Tensor, objective: TrajectoryObjective, world: World):
        """One action per particle state ``s_t`` [B,K,S]: (a, u [B,K,A], log p/q [B,K])."""
        b, k, _ = s_t.shape
        rows = s_t.reshape(b * k, -1)
        if self.proposal is None:
            draw = propose(objective.prior, rows, 1)
        else:
            # The proposal sees the leaf value at the particles' states (the objective
            # an amortised engine was trained on).
            rows_objective = TrajectoryObjective(rows, world.leaf, objective.prior, objective.alpha)
            draw = propose(objective.prior, rows, 1, self.proposal.infer(rows, rows_objective))
        ratio = (draw.log_p - draw.log_q).reshape(b, k)
        return draw.a.reshape(b, k, -1), draw.u.reshape(b, k, -1), ratio

    def _plan(self, s: torch.Tensor, objective: TrajectoryObjective, world: World):
        trajectories = self._trajectories
        if self.compile:
            if self._compiled is None:
                # Static shapes: one graph per (B, K, H), the loop unrolled, so that the
                # per-step elementwise work fuses around the model's and critic's matmuls.
                self._compiled = torch.compile(
                    self._trajectories,
                    dynamic=False,
                    options={"fallback_random": True, "cpp_wrapper": True},
                )
            trajectories = self._compiled
        first_a, first_u, log_w, collapsed, resampled, log_q = trajectories(s, objective, world)
        # Without resampling the particles are one draw from q, whose density KL needs.
        log_q = None if bool(resampled) else log_q
        return WeightedParticles(first_a, log_w, log_q, first_u, self.mode, collapsed)

    def _trajectories(self, s: torch.Tensor, objective: TrajectoryObjective, world: World):
        """Algorithm 1 without data-dependent branches (a state that needs no
        resampling keeps its particles through ``torch.where``), so that it compiles
        into one graph.  Returns (first actions a_0 [B,K,A], their u, log-weights
        [B,K], collapsed [B], whether any state resampled (0-dim bool), log q(a_0) [B,K])."""
        b, k, alpha, gamma = s.shape[0], self.n_particles, objective.alpha, world.gamma
        # t = 0: importance sampling of a_0 (Eq. 11), the proposal drawn once per state.
        draw = propose(objective.prior, s, k, self.proposal_posterior(s, objective))
        a, first_a, first_u = draw.a, draw.a, draw.u
        s_t = s.unsqueeze(1).expand(b, k, s.shape[-1])
        q_t = world.leaf_rows(s_t, a)
        log_w = q_t / alpha + (draw.log_p - draw.log_q)
        discount, alive = 1.0, torch.ones_like(q_t)  # γ^{t-1}, m_{t-1}
        collapsed = torch.zeros(b, dtype=torch.bool, device=s.device)
        resampled = torch.zeros((), dtype=torch.bool, device=s.device)
        keep = torch.arange(k, device=s.device).expand(b, k)
        uniform = torch.full_like(log_w, -math.log(k))
        for _ in range(1, self.horizon):
            log_w, dead = normalise_log_weights(log_w)
            collapsed = collapsed | dead
            if self.ess_threshold >= 1.0:  # ESS = K can round above K: always resample
                need = torch.ones_like(dead)
            else:
                need = ess(log_w) / k <= self.ess_threshold
            resampled = resampled | need.any()
            idx = torch.where(need.unsqueeze(-1), resample(self.resample, log_w), keep)
            s_t, a, q_t, alive, first_a, first_u = (
                take_particles(x, idx) for x in (s_t, a, q_t, alive, first_a, first_u)
            )
            log_w = torch.where(need.unsqueeze(-1), uniform, log_w)
            out = world.step(s_t.reshape(b * k, -1), a.reshape(b * k, -1), world.propagation)
            s_t = out.next_state.reshape(b, k, -1)
            r = out.reward.reshape(b, k)
            alive_next = alive * (1.0 - out.terminated.reshape(b, k).to(r.dtype))
            a, _, log_ratio = self._propose(s_t, objective, world)
            q_next = world.leaf_rows(s_t, a)
            increment = discount * (alive * r + gamma * alive_next * q_next - alive * q_t)
            log_w = log_w + increment / alpha + log_ratio
            discount, alive, q_t = discount * gamma, alive_next, q_next
        return first_a, first_u, log_w, collapsed, resampled, draw.log_q
