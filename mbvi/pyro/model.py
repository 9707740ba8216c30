"""The optimality graphical model (paper Fig. 1a, Eq. 5-7) as a Pyro program.

For t = 0..H the model samples a_t ~ p_θ(a_t|s_t) at site ``a_t``, adds
``pyro.factor("r_t", r_t/α)`` and steps s_{t+1} = f(s_t, a_t); at the leaf it adds
``pyro.factor("leaf", Q̂(s_H, a_H)/α)``.  The factors carry log p(O=1|τ), so with a
guide π(τ|O) = Π_t p_env(s_{t+1}|s_t,a_t) π(a_t|s_t,O) (Eq. 5)

    α · ELBO = E_π[ Σ_t γ^t (r_t − α log π(a_t|s_t,O)/p_θ(a_t|s_t)) + γ^H Q̂(s_H,a_H) ]

which is J of Eq. 6-7 truncated at H with a leaf value; H=0 is Eq. 16.  Under a prior
in the entropy form (``Prior.set_kl_form``) each step also adds
``pyro.factor("dropped_t", −Prior.dropped_log_density())``, so that the model's prior
density is the one that form reads.  The model is
vectorised over B states (plate dim -2) and N particles (plate dim -1), and
``OptimalityModel.elbo`` averages over particles, so α·ELBO = Σ_b J̃(s_b).
``mbvi.pyro.native_objective`` computes the same estimate in plain torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from mbvi.errors import ConfigError
from mbvi.pyro.prior import ProgramPrior
from mbvi.pyro.sites import (
    ACTION,
    PriorProgram,
    StepSites,
    prior_distribution,
    program_name,
    run_prior_program,
    tanh_normal,
)
from mbvi.variational.distributions import TanhGaussian
from mbvi.variational.objectives import ValueFn
from mbvi.variational.priors import Prior
from mbvi.variational.rollouts import per_particle

DROPPED = "dropped"
"""Factor site (renamed ``dropped_t``) of the constant log-density a KL form drops."""

Dynamics = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""s_{t+1} = f(s_t [B,N,S], a_t [B,N,A]) -> [B,N,S]; deterministic, or a Pyro program."""
RewardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""r_t = r(s_t [B,N,S], a_t [B,N,A]) -> [B,N]."""
Policy = Callable[[torch.Tensor], TanhGaussian]
"""π(·|s,O) for states [M,S] -> a TanhGaussian [M,A], e.g. ``engine.infer``."""


def particle_states(s: torch.Tensor, n: int) -> torch.Tensor:
    """States [B,S] (shared by the particles, t = 0) or [B,N,S] -> [B,N,S]."""
    return s.unsqueeze(1).expand(-1, n, -1) if s.dim() == 2 else s


def _discount(gamma: float, t: int):
    return poutine.scale(scale=gamma**t) if gamma != 1.0 else contextlib.nullcontext()


@dataclass(eq=False)
class OptimalityModel:
    """Fig. 1a with its parts; calling it runs the Pyro model on states [B,S].

    Args:
        prior: an mbvi ``Prior`` (built; a ``ProgramPrior`` runs its program) or a Pyro
            program ``prior(s)`` with a ``pyro.sample("a", ...)`` site of shape [B,N,A]
            in [-1,1]^A.
        leaf_value: Q̂ at the leaf, ``value(s [B,S], a [B,N,A]) -> [B,N]``.
        alpha: temperature α > 0 (float or scalar tensor).
        horizon: H, model steps before the leaf; 0 is the model-free Eq. 16.
        n_particles: N, Monte-Carlo trajectories per state.
        dynamics: s_{t+1} = f(s_t, a_t); needed when H > 0.
        reward_fn: r(s_t, a_t); needed when H > 0.
        gamma: discount of step t's reward and KL and of the leaf (γ^t, γ^H).
        act_dim: A; read from an mbvi ``Prior``, required for a prior program.
    """

    prior: Prior | PriorProgram
    leaf_value: ValueFn
    alpha: float | torch.Tensor
    horizon: int = 0
    n_particles: int = 16
    dynamics: Dynamics | None = None
    reward_fn: RewardFn | None = None
    gamma: float = 1.0
    act_dim: int | None = None

    def __post_init__(self) -> None:
        if not float(self.alpha) > 0:
            raise ConfigError(f"alpha must be > 0 (the temperature of Eq. 6), got {self.alpha}")
        if self.horizon < 0 or self.n_particles < 1:
            raise ConfigError(
                f"horizon must be >= 0 and n_particles >= 1, got {self.horizon}, {self.n_particles}"
            )
        if self.horizon > 0 and (self.dynamics is None or self.reward_fn is None):
            raise ConfigError(f"horizon={self.horizon} > 0 needs dynamics and reward_fn")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"gamma must be in (0, 1], got {self.gamma}")
        if isinstance(self.prior, Prior):
            built = getattr(self.prior, "act_dim", None)
            if self.act_dim is not None and built is not None and self.act_dim != built:
                raise ConfigError(f"act_dim={self.act_dim} but the prior has {built}")
            self.act_dim = self.act_dim or built
        if self.act_dim is None:
            raise ConfigError("act_dim is required: build the prior or pass act_dim")

    def _plates(self, b: int):
        return pyro.plate("states", b, dim=-2), pyro.plate("particles", self.n_particles, dim=-1)

    def _sample_prior(self, s: torch.Tensor, step: StepSites) -> torch.Tensor:
        """a_t ~ p_θ(·|s_t) at site ``a`` (renamed ``a_t`` by ``step``), checked when the
        prior is a user's program."""
        b, n, a_dim = s.shape[0], self.n_particles, self.act_dim
        prior, name = self.prior, program_name(self.prior)
        if isinstance(prior, ProgramPrior):
            prior, name = prior.pyro_program, repr(prior.program)
        if isinstance(prior, Prior):
            a = pyro.sample(ACTION, prior_distribution(prior, s, b, a_dim))
            dropped = prior.dropped_log_density()
            if dropped:
                # The entropy form reads log p − dropped (log π rather than log π/p for
                # the uniform prior): the same unnormalised density here, so that α·ELBO
                # stays the objective the agent optimises in either form.
                pyro.factor(DROPPED, s.new_full((b, n), -dropped))
            return a
        s = s.unsqueeze(1) if s.dim() == 2 else s
        return run_prior_program(prior, s, step, name, (b, n, a_dim))

    def __call__(self, states: torch.Tensor) -> None:
        """The Pyro model: sites a_t (t=0..H), factors r_t (t<H) and ``leaf``."""
        s, n, alpha = states, self.n_particles, self.alpha
        states_plate, particles_plate = self._plates(states.shape[0])
        with states_plate, particles_plate:
            for t in range(self.horizon + 1):
                with StepSites(t) as step, _discount(self.gamma, t):
                    a = self._sample_prior(s, step)
                    if t == self.horizon:
                        break
                    s = particle_states(s, n)
                    pyro.factor("r", self.reward_fn(s, a) / alpha)
                    s = self.dynamics(s, a)
            with _discount(self.gamma, self.horizon):
                pyro.factor("leaf", per_particle(self.leaf_value, s, a) / alpha)

    def guide(self, posterior: TanhGaussian | None = None, policy: Policy | None = None):
        """A Pyro guide sampling the model's sites a_t from an engine's posterior: a_0
        from ``posterior`` [B,A] (or ``policy(s_0)``), a_t for t >= 1 from
        ``policy(s_t)``; states follow the model's own dynamics (Eq. 5)."""
        if posterior is None and policy is None:
            raise ConfigError("guide needs a posterior (TanhGaussian [B,A]) or a policy")
        if self.horizon > 0 and policy is None:
            raise ConfigError(f"horizon={self.horizon} > 0: the guide needs a policy for a_t, t>=1")

        def guide(states: torch.Tensor) -> None:
            b, n, s = states.shape[0], self.n_particles, states
            states_plate, particles_plate = self._plates(b)
            with states_plate, particles_plate:
                for t in range(self.horizon + 1):
                    d = posterior if t == 0 and posterior is not None else policy(_rows(s))
                    loc = d.loc.reshape(b, -1, self.act_dim)
                    log_scale = d.log_scale.reshape(b, -1, self.act_dim)
                    with StepSites(t), _discount(self.gamma, t):
                        a = pyro.sample(ACTION, tanh_normal(loc, log_scale))
                        if t < self.horizon:
                            s = self.dynamics(particle_states(s, n), a)

        return guide

    def elbo(self, guide: Callable, states: torch.Tensor) -> torch.Tensor:
        """α · ELBO averaged over particles and summed over states: Σ_b J̃(s_b), a
        differentiable scalar (Trace_ELBO; pathwise for the tanh-Gaussian guide)."""
        loss = Trace_ELBO(max_plate_nesting=2).differentiable_loss(self, guide, states)
        return -loss * self.alpha / self.n_particles


def _rows(s: torch.Tensor) -> torch.Tensor:
    return s.reshape(-1, s.shape[-1])


def optimality_model(
    states: torch.Tensor,
    prior: Prior | PriorProgram,
    dynamics: Dynamics | None,
    reward_fn: RewardFn | None,
    leaf_value: ValueFn,
    alpha: float | torch.Tensor,
    horizon: int = 0,
    n_particles: int = 16,
    gamma: float = 1.0,
    act_dim: int | None = None,
) -> None:
    """Run the optimality model of Fig. 1a once on ``states`` [B,S] (see module doc)."""
    OptimalityModel(
        prior, leaf_value, alpha, horizon, n_particles, dynamics, reward_fn, gamma, act_dim
    )(states)
