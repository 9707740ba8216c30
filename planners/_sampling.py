"""Machinery shared by the sampling planners (ImportanceSampling, SVGD, SMC, MPPI,
CEM): resampling, effective sample size, the RBF kernel, drawing from a proposal,
the world a planner rolls through, the score of an action sequence, and two private
base classes (a planner with an optional amortised proposal; a planner over action
sequences with a warm-started plan).

Shapes: B states, K particles, H planned actions, A action dims, S state dims.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from mbvi.errors import ConfigError
from mbvi.planners._gradient_tools import check_count
from mbvi.planners.base import InferenceEngine
from mbvi.variational.distributions import Posterior, TanhGaussian, atanh
from mbvi.variational.model_value import ModelBasedValue
from mbvi.variational.objectives import TrajectoryObjective, policy_kl, trajectory_return
from mbvi.variational.particles import WeightedParticles
from mbvi.variational.priors import Prior
from mbvi.variational.rollouts import frozen_module, rollout
from mbvi.variational.world_model import WorldModel

# ---- weights and resampling -------------------------------------------------------------


def ess(log_w: torch.Tensor) -> torch.Tensor:
    """Effective sample size 1 / Σ_k w_k² of normalised log-weights ``[B,K]`` -> ``[B]``."""
    return torch.exp(-torch.logsumexp(2.0 * log_w, -1))


def systematic_resample(log_w: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """Systematic resampling: one uniform offset per state, n evenly spaced positions
    (j + U)/n through the weights' CDF.  Particle k is picked floor(n w_k) or
    ceil(n w_k) times, with expected count n w_k.  ``log_w`` [B,K] normalised;
    returns indices ``[B,n]`` (n = K by default)."""
    b, k = log_w.shape
    n = k if n is None else n
    cdf = log_w.exp().cumsum(-1)
    cdf = (cdf / cdf[:, -1:]).contiguous()
    offset = torch.rand(b, 1, dtype=log_w.dtype, device=log_w.device)
    positions = (torch.arange(n, dtype=log_w.dtype, device=log_w.device) + offset) / n
    # right=True: the first k with cdf_k > position, so zero-weight particles are skipped.
    return torch.searchsorted(cdf, positions.contiguous(), right=True).clamp_max(k - 1)


def multinomial_resample(log_w: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """n independent draws by weight per state, ``[B,n]`` (higher variance than
    systematic resampling, kept for comparison)."""
    return torch.multinomial(log_w.exp(), log_w.shape[-1] if n is None else n, replacement=True)


RESAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "systematic": systematic_resample,
    "multinomial": multinomial_resample,
}


def resample(method: str, log_w: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """Indices ``[B,n]`` drawn from normalised ``log_w`` [B,K] by ``method``."""
    return RESAMPLERS[method](log_w, n)


def check_resample(engine: str, method: str) -> None:
    if method not in RESAMPLERS:
        raise ConfigError(
            f"{engine}: resample must be one of {', '.join(RESAMPLERS)}, got {method!r}"
        )


# ---- SVGD's kernel ----------------------------------------------------------------------


def rbf_kernel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RBF kernel k_ij = exp(−‖x_i − x_j‖² / h) between the K particles of each state,
    ``x`` [B,K,D] -> (k [B,K,K], h [B,1,1]), with the median heuristic of Liu & Wang
    (2016): h = med / log(K + 1), med the median of the squared pairwise distances
    (diagonal included, as in their code), so that Σ_j k_ij ≈ 1 + K·K^(-1)."""
    d2 = (x.unsqueeze(-2) - x.unsqueeze(-3)).pow(2).sum(-1)
    med = d2.flatten(1).median(-1).values
    h = (med / math.log(x.shape[1] + 1.0)).clamp_min(1e-12).detach()
    h = h.view(-1, 1, 1)
    return torch.exp(-d2 / h), h


# ---- proposals ------------------------------------------------------------------------


@dataclass
class Draw:
    """n proposal actions per state: ``a``, ``u`` = atanh(a) [B,n,A], log q and the
    prior's log p of each, ``[B,n]``."""

    a: torch.Tensor
    u: torch.Tensor
    log_q: torch.Tensor
    log_p: torch.Tensor


def propose(prior: Prior, s: torch.Tensor, n: int, posterior: Posterior | None = None) -> Draw:
    """n actions per state ``s`` [B,S] from ``posterior`` (a proposal engine's), or
    from the prior p_θ(·|s) when None (then log q is the prior's density: log p plus the
    constant that the objective's KL form drops, ``Prior.dropped_log_density``)."""
    if posterior is None:
        dist = prior.distribution(s)
        if dist is not None:
            a, u, log_q = dist.rsample_with_log_prob(n)
            return Draw(a, u, log_q, log_q)
        a = prior.sample(s, n)
        u = atanh(a)
        log_p = prior.log_prob(s, a, u)
        # The density the actions were drawn from, whatever the KL form drops from log p
        # (the uniform prior's entropy form reads log p = 0, its density is 2^-A).
        return Draw(a, u, log_p + prior.dropped_log_density(), log_p)
    if isinstance(posterior, TanhGaussian):
        a, u, log_q = posterior.rsample_with_log_prob(n)
    else:
        a = posterior.sample(n)
        u, log_q = atanh(a), posterior.log_prob(a)
    return Draw(a, u, log_q, prior.log_prob(s, a, u))


# ---- the world a planner rolls through --------------------------------------------------


@dataclass
class World:
    """What a planner reads from the objective's value estimate.

    Attributes:
        step: one model transition ``step(s [M,S], a [M,A], propagation) -> Step``
            with frozen parameters, or None for a model-free value.
        leaf: Q̂ at the end of a plan, ``leaf(s [M,S], a [M,N,A]) -> [M,N]``.
        gamma: discount γ.
        propagation: how particles move through an ensemble.
    """

    step: Callable | None
    leaf: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    gamma: float
    propagation: str

    def leaf_rows(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Leaf Q̂ of per-particle states ``s`` [B,K,S] and actions ``a`` [B,K,A] -> [B,K]."""
        b, k = a.shape[:2]
        q = self.leaf(s.reshape(b * k, -1), a.reshape(b * k, 1, -1))
        return q.reshape(b, k)


def plan_world(
    value: Callable,
    engine: str,
    horizon: int,
    model: WorldModel | None,
    gamma: float,
) -> World:
    """The world model, leaf value and γ a planner uses with an objective's ``value``.

    With a ``ModelBasedValue`` (called as ``partial(value, frozen=True)`` in
    inference, or through ``value.target`` in a TD target) the planner rolls the
    value's world model (or ``model`` when given, e.g. the true simulator) and reads
    its leaf critic: the planner's horizon replaces the value's.  γ is the one the
    value was bound with, else ``gamma``.  A model-free value is the leaf itself, and
    a horizon above 1 then needs an explicit ``model``.
    """
    fn = value
    owner = fn.func if isinstance(fn, partial) else getattr(fn, "__self__", fn)
    if isinstance(owner, ModelBasedValue):
        is_forward = fn is owner or (isinstance(fn, partial) and fn.func is owner)
        leaf = partial(owner.leaf, frozen=True) if is_forward else fn  # target: the leaf's
        bound = owner._bound
        gamma = bound[3] if bound is not None else gamma
        step = frozen_module(model if model is not None else owner.model)
        return World(step, leaf, gamma, owner.propagation)
    if model is None and horizon > 1:
        raise ConfigError(
            f"{engine}: a horizon of {horizon} plans through a world model, but the value "
            f"estimate ({type(owner).__name__}) is model-free; use a model-based value "
            f"(mbvi.variational.model_value.ModelBasedValue) or pass an explicit model "
            f"to {engine}(model=...), or set horizon=1"
        )
    return World(frozen_module(model) if model is not None else None, fn, gamma, "ts1")


def sequence_returns(
    objective: TrajectoryObjective, world: World, a: torch.Tensor, u: torch.Tensor
) -> torch.Tensor:
    """α log of the unnormalised trajectory posterior of action sequences ``a``
    [B,K,H,A] (pre-tanh ``u``) from the objective's states, ``[B,K]``::

        G + α Σ_{t<H} log p_θ(a_t|s_t),
        G = Σ_{t<H−1} γ^t m_t r_t + γ^{H−1} m_{H−1} Q̂_leaf(s_{H−1}, a_{H−1})

    (``trajectory_return`` with no KL terms): H−1 model steps, and the last planned
    action scored by the leaf value, whose Q̂(s,a) ≈ r + γ V(s') covers the last
    step.  For H = 1 and a model-free value this is ``objective.action_values``
    (Eq. 11 at H = 0).
    """
    b, k, h, a_dim = a.shape
    if h == 1 and world.step is None:
        return objective.action_values(a[:, :, 0], u[:, :, 0])
    roll = rollout(
        world.step, objective.states, a[:, :, 0], h - 1, objective.prior,
        propagation=world.propagation, actions=a[:, :, 1:].permute(2, 0, 1, 3),
    )  # fmt: skip
    leaf = world.leaf_rows(roll.states[-1], roll.actions[-1])
    g = trajectory_return(
        roll.rewards, torch.zeros_like(roll.alive), roll.alive, leaf, objective.alpha, world.gamma
    )
    rows = roll.states.reshape(h * b * k, -1)
    log_p = objective.prior.log_prob(
        rows, roll.actions.reshape(-1, 1, a_dim), u.permute(2, 0, 1, 3).reshape(-1, 1, a_dim)
    )
    return g + objective.alpha * log_p.reshape(h, b, k).sum(0)


# ---- base classes -----------------------------------------------------------------------


def check_gamma(engine: str, gamma: float) -> None:
    if not 0.0 < gamma <= 1.0:
        raise ConfigError(f"{engine}: gamma must lie in (0, 1], got {gamma}")


def check_mode(engine: str, mode: str) -> None:
    if mode not in ("mean", "best"):
        raise ConfigError(
            f"{engine}: mode must be 'mean' (weighted mean action) or 'best' (heaviest "
            f"particle), got {mode!r}"
        )


class ProposalEngine(InferenceEngine):
    """A non-amortised engine with an optional amortised ``proposal`` engine.

    With a proposal the engine is as amortised as the proposal: ``loss`` trains the
    proposal (its metrics are the proposal's), and ``td_posterior`` is the proposal's
    posterior, so a TD target never runs a plan per replay state.  Without one,
    ``loss`` is zero and its metrics summarise the particles (``particle_metrics``).
    """

    amortised = False

    def _set_proposal(self, proposal: InferenceEngine | None) -> None:
        self.proposal = proposal
        self.amortised = proposal is not None and proposal.amortised

    def build(self, obs_dim: int, act_dim: int) -> None:
        super().build(obs_dim, act_dim)
        if self.proposal is not None:
            self.proposal.build(obs_dim, act_dim)
        model = getattr(self, "model", None)
        if model is not None:
            model.build(obs_dim, act_dim)

    def check_prior(self, prior: Prior) -> None:
        if self.proposal is not None:
            self.proposal.check_prior(prior)

    def check_value(self, value: Callable) -> None:
        """Raise ``ConfigError`` at configuration time if this engine cannot plan with
        the value estimate ``value`` (a horizon above 1 needs a world model)."""
        horizon = getattr(self, "horizon", 1)
        plan_world(value, type(self).__name__, horizon, getattr(self, "model", None), 1.0)

    def proposal_posterior(self, s: torch.Tensor, objective: TrajectoryObjective):
        """The proposal's posterior at ``s`` [B,S], or None (propose from the prior)."""
        return None if self.proposal is None else self.proposal.infer(s, objective)

    def td_posterior(self, s: torch.Tensor, objective: TrajectoryObjective) -> Posterior:
        if self.proposal is not None:
            return self.proposal.infer(s, objective)
        return self.infer(s, objective)

    def loss(
        self, s: torch.Tensor, objective: TrajectoryObjective
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.proposal is not None:
            return self.proposal.loss(s, objective)
        with torch.no_grad():
            metrics = particle_metrics(self.infer(s, objective), objective)
        return torch.zeros((), dtype=s.dtype, device=s.device), metrics


def particle_metrics(
    posterior: WeightedParticles, objective: TrajectoryObjective, n_samples: int = 64
) -> dict[str, torch.Tensor]:
    """Loss metrics of a particle posterior: ``kl`` [B] (the importance estimator of
    ``WeightedParticles.kl`` where the proposal density is known, else the KL of the
    moment-matched tanh-Gaussian), ``loc``/``log_scale`` [B,A] of that tanh-Gaussian
    (what a learned prior is fitted to), and the scalars ``ess`` (mean ESS/K) and
    ``collapsed`` (fraction of states whose weights collapsed)."""
    fitted = posterior.moment_match()
    s = objective.states
    try:
        kl = posterior.kl_to_prior(objective.prior, s)
    except NotImplementedError:
        a, u = fitted.rsample(n_samples)
        kl = policy_kl(fitted, objective.prior, s, a, objective.prior_dist, u)
    return {
        "kl": kl,
        "loc": fitted.loc,
        "log_scale": fitted.log_scale,
        "ess": (posterior.ess() / posterior.n_particles).mean(),
        "collapsed": posterior.collapsed.to(s.dtype).mean(),
    }


class SequencePlanner(ProposalEngine):
    """Shared machinery of MPPI and CEM: Gaussian search over pre-tanh action
    sequences u [B,K,H,A] (a = tanh(u)) scored by ``sequence_returns``, and a plan
    state for warm starts owned by the caller (one per env runner)::

        state = engine.init_plan_state(n_envs)
        posterior = engine.infer(s, objective, state)   # updates state in place
        engine.reset_plan_state(state, done)             # at episode ends

    After each plan ``state['plan']`` holds the final mean sequence and
    ``state['mean']`` that plan shifted by one step, the new last step at u = 0: the
    next call starts from it.  Subclasses implement ``_optimise``.
    """

    horizon: int
    population: int
    init_std: float

    def init_plan_state(
        self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> dict[str, torch.Tensor]:
        """A fresh plan state for ``batch`` states: mean u = 0 (a = 0), ``[B,H,A]``."""
        return {"mean": torch.zeros(batch, self.horizon, self.act_dim, device=device, dtype=dtype)}

    def reset_plan_state(self, state: dict, done: torch.Tensor | None = None) -> None:
        """Reset, in place, the rows of ``state`` whose episode ended (``done`` [B]
        bool), or the whole state when ``done`` is None."""
        if done is None:
            fresh = self.init_plan_state(
                state["mean"].shape[0], state["mean"].device, state["mean"].dtype
            )
            state.clear()
            state.update(fresh)
            return
        for value in state.values():
            value[done.to(value.device)] = 0.0

    def infer(
        self, s: torch.Tensor, objective: TrajectoryObjective, plan_state: dict | None = None
    ) -> WeightedParticles:
        """Plan from ``plan_state`` (or a fresh one); returns the final population's
        first actions as ``WeightedParticles`` [B,K,A]."""
        self.check_states(s, self.obs_dim)
        world = plan_world(
            objective.value, type(self).__name__, self.horizon, self.model, self.gamma
        )
        state = plan_state if plan_state is not None else self.init_plan_state(s.shape[0])
        expected = (s.shape[0], self.horizon, self.act_dim)
        if tuple(state["mean"].shape) != expected:
            raise ValueError(
                f"{type(self).__name__}: plan state mean must be {list(expected)}, got "
                f"{list(state['mean'].shape)}; make one with init_plan_state({s.shape[0]})"
            )
        with torch.no_grad():
            posterior, plan = self._optimise(objective, world, state["mean"].to(s))
        state["plan"] = plan.to(state["mean"])
        state["mean"] = torch.cat([state["plan"][:, 1:], torch.zeros_like(state["plan"][:, :1])], 1)
        return posterior

    def sample_sequences(self, mean: torch.Tensor, std) -> torch.Tensor:
        """K pre-tanh sequences per state around ``mean`` [B,H,A], ``[B,K,H,A]``."""
        shape = (mean.shape[0], self.population, *mean.shape[1:])
        noise = torch.randn(shape, dtype=mean.dtype, device=mean.device)
        std = std.unsqueeze(1) if isinstance(std, torch.Tensor) else std
        return mean.unsqueeze(1) + std * noise

    def _optimise(
        self, objective: TrajectoryObjective, world: World, mean: torch.Tensor
    ) -> tuple[WeightedParticles, torch.Tensor]:
        """(posterior over first actions, final mean sequence [B,H,A])."""
        raise NotImplementedError


def check_sequence_options(
    engine: str, population: int, iterations: int, horizon: int, init_std: float, gamma: float
) -> None:
    check_count(engine, "population", population)
    check_count(engine, "iterations", iterations)
    check_count(engine, "horizon", horizon)
    if not init_std > 0:
        raise ConfigError(f"{engine}: init_std must be > 0, got {init_std}")
    check_gamma(engine, gamma)
