"""SMC planning (SMCP, Piché et al., 2019, Algorithm 1) written as a model/guide pair for
Pyro's ``SMCFilter``: the reference that ``mbvi.planners.SMC`` is checked and timed
against, with the same prior/proposal, world model, reward, leaf value Q̂ and α.

One filter plans for one state (``SMCFilter`` keeps one weight vector, on the CPU)::

    ref = SMCReference(prior, world_model, leaf, alpha=1.0, gamma=0.9, horizon=3,
                       n_particles=4000)
    first_a, log_w = ref.plan(s)          # s [S] -> a_0 [K,A], normalised log w [K]

Step t of the filter is step t of Algorithm 1.  The model samples the pre-tanh action
u_t ~ p_θ(·|s_t) (a TanhGaussian prior, a_t = tanh u_t) and scores it with a factor::

    t = 0:  Q̂(s_0, a_0)/α
    t ≥ 1:  γ^{t-1} [m_{t-1} r_{t-1} + γ m_t Q̂(s_t, a_t) − m_{t-1} Q̂(s_{t-1}, a_{t-1})]/α

(the value telescopes: after the last step Σ factors = G/α), and then moves its
particles one model step on, s_{t+1}, r_t = model(s_t, a_t), so the next step's guide
reads s_{t+1}.  The guide proposes u_t from the same prior, so log p/q = 0 and only
the factors weigh, as in ``SMC`` with ``proposal=None``.  With ``ess_threshold=1``
the filter resamples after every step, the schedule of ``SMC(ess_threshold=1)``
(SMC resamples before each model step; with a deterministic model the two agree
particle by particle, with a stochastic one a resampled copy here shares its
parent's next-state draw).  The filter also resamples after the last step, which
leaves the posterior over first actions unchanged in expectation.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.smcfilter import SMCFilter, _systematic_sample

from mbvi.variational.priors import Prior
from mbvi.variational.world_model import WorldModel

_ACTION = "u_{}"  # the pre-tanh action site of step t


def _prior_site(prior: Prior, s: torch.Tensor, t: int) -> torch.Tensor:
    """Sample u_t ~ p_θ(·|s) at particle states ``s`` [K,S] -> u [K,A]."""
    d = prior.distribution(s)
    if d is None:
        raise TypeError(
            f"SMCReference needs a prior whose distribution(s) is a TanhGaussian, got "
            f"{type(prior).__name__}"
        )
    base = dist.Normal(d.loc, d.log_scale.exp()).to_event(1)
    return pyro.sample(_ACTION.format(t), base)


class _Model:
    """The optimality model of Fig. 1a, one step at a time, for ``SMCFilter``."""

    def __init__(self, ref: SMCReference):
        self.ref = ref

    def _q(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.ref.leaf(s, a.unsqueeze(1)).squeeze(1)

    def _advance(self, state) -> None:
        """s_{t+1}, r_t = model(s_t, a_t); m_{t+1} = m_t (1 − terminated)."""
        out = self.ref.model.step(state["s"], state["a"], self.ref.propagation)
        state["r"] = out.reward
        state["alive_next"] = state["alive"] * (1.0 - out.terminated.to(out.reward.dtype))
        state["s"] = out.next_state

    def init(self, state, s0: torch.Tensor) -> None:
        ref, k = self.ref, self.ref.n_particles
        s = s0.expand(k, s0.shape[-1])
        u = _prior_site(ref.prior, s, 0)
        a = torch.tanh(u)
        q = self._q(s, a)
        pyro.factor("optimality_0", q / ref.alpha)  # Algorithm 1, t = 0
        self.t, self.discount = 0, 1.0  # γ^t
        state["s"], state["a"], state["q"] = s, a, q
        state["alive"] = torch.ones_like(q)
        state["first_a"], state["first_u"] = a, u
        if ref.horizon > 1:
            self._advance(state)

    def step(self, state) -> None:
        ref = self.ref
        self.t += 1
        u = _prior_site(ref.prior, state["s"], self.t)
        a = torch.tanh(u)
        q_next = self._q(state["s"], a)
        alive, alive_next = state["alive"], state["alive_next"]
        # SMCP's A = r + V(s') − V(s), with Q̂ for V: the crucial −Q̂(s_{t-1}, a_{t-1}).
        increment = alive * state["r"] + ref.gamma * alive_next * q_next - alive * state["q"]
        pyro.factor(f"optimality_{self.t}", self.discount * increment / ref.alpha)
        self.discount *= ref.gamma
        state["a"], state["q"], state["alive"] = a, q_next, alive_next
        if self.t < ref.horizon - 1:
            self._advance(state)


class _Guide:
    """The proposal: the prior itself, at the particles' current states."""

    def __init__(self, ref: SMCReference):
        self.ref = ref

    def init(self, state, s0: torch.Tensor) -> None:
        _prior_site(self.ref.prior, s0.expand(self.ref.n_particles, s0.shape[-1]), 0)

    def step(self, state) -> None:
        _prior_site(self.ref.prior, state["s"], self.ref.model_t + 1)


class _Filter(SMCFilter):
    """``SMCFilter`` with its systematic resampler's indices kept below K: with float32
    weights whose cumulative sum ends a rounding error below 1, Pyro's can return K."""

    def _importance_resample(self, probs):
        self.state._resample(_systematic_sample(probs).clamp_(max=self.num_particles - 1))


class SMCReference:
    """SMCP planning through ``pyro.infer.SMCFilter``.

    Args:
        prior: p_θ(a|s), whose ``distribution(s)`` is a TanhGaussian; also the proposal.
        model: the world model (``step(s, a, propagation) -> Step``), built.
        leaf: Q̂ at a plan's end, ``leaf(s [M,S], a [M,N,A]) -> [M,N]`` (e.g.
            ``partial(value.leaf, frozen=True)``).
        alpha: temperature α.
        gamma: discount γ.
        horizon: H >= 1 actions (H − 1 model steps).
        n_particles: K.
        ess_threshold: the filter resamples when ESS < ess_threshold · K.
        propagation: passed to ``model.step``.
    """

    def __init__(
        self,
        prior: Prior,
        model: WorldModel,
        leaf: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        alpha: float,
        gamma: float,
        horizon: int,
        n_particles: int,
        ess_threshold: float = 1.0,
        propagation: str = "ts1",
    ):
        if horizon < 1 or n_particles < 1:
            raise ValueError(f"horizon and n_particles must be >= 1, got {horizon}, {n_particles}")
        self.prior, self.model, self.leaf = prior, model, leaf
        self.alpha, self.gamma, self.horizon = alpha, gamma, horizon
        self.n_particles, self.ess_threshold, self.propagation = (
            n_particles,
            ess_threshold,
            propagation,
        )
        self._model, self._guide = _Model(self), _Guide(self)

    @property
    def model_t(self) -> int:
        """The step the model last took (the guide proposes for the next one)."""
        return self._model.t

    def filter(self, s: torch.Tensor) -> SMCFilter:
        """Run the H steps of the filter for one state ``s`` [S]; returns the filter
        (its ``state`` holds each particle's ``first_a``, ``first_u``, and weights)."""
        smc = _Filter(
            self._model, self._guide, self.n_particles, max_plate_nesting=0,
            ess_threshold=self.ess_threshold,
        )  # fmt: skip
        with torch.no_grad():
            smc.init(s)
            for _ in range(1, self.horizon):
                smc.step()
        return smc

    def plan(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """First actions a_0 [K,A] and their normalised log weights [K] for state ``s`` [S]."""
        smc = self.filter(s)
        log_w = smc.state._log_weights
        return smc.state["first_a"], log_w - log_w.logsumexp(-1)
