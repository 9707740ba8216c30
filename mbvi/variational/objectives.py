"""The variational objective over trajectories (Eq. 6-7 truncated at H, Eq. 16 at
H = 0) and the losses built on it, as pure functions of tensors, plus
``TrajectoryObjective``: the objective closed over one batch of states.

One definition serves every user: ``trajectory_return`` scores imagined trajectories
(``mbvi.variational.rollouts``) for the model-based value, the planners and the Pyro
check; ``TrajectoryObjective`` is J̃(s, π) = E_π[Q̂_H(s, a)] − α KL_0, whose Q̂_H is
a model-free critic (H = 0: Eq. 16 exactly) or ``ModelBasedValue``'s H-step return.

KL forms.  Every KL term here is KL(π‖p) read through ``prior.log_prob`` (or the
prior's closed form), so the prior's ``kl_form`` (``Prior.set_kl_form``) reaches the
policy loss, the TD target (Eq. 9-10), the model-based value's future terms and the
planners' weights alike.  Under the uniform prior KL(π‖U) = −H(π) + A log 2: the
``kl`` form (Eq. 7) charges α A log 2 on every step a trajectory lives, so a
termination that ends the sum early saves that charge; the ``entropy`` form drops the
constant (Eq. 12), which is SAC's objective exactly.

Shapes: H horizon, B states, N action samples, A action dims.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from mbvi.variational.distributions import Posterior, TanhGaussian, atanh
from mbvi.variational.priors import Prior

ValueFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""value(s [B,S], a [B,N,A]) -> Q̂ [B,N]."""


def soft_objective(q: torch.Tensor, kl: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
    """J̃ = E_π[Q̂] − α KL (Eq. 16): ``q`` [B,N] Monte-Carlo values, ``kl`` [B] -> [B]."""
    return q.mean(-1) - alpha * kl


def soft_td_target(
    reward: torch.Tensor, terminated: torch.Tensor, next_v: torch.Tensor, gamma: float
) -> torch.Tensor:
    """Soft Bellman target r + γ (1 − d) V(s') (Eq. 9), all ``[B]``.

    ``next_v`` is V(s') = E_π[Q̂(s',a')] − α KL (Eq. 10), i.e. J̃ at the next state.
    Only true termination stops bootstrapping: a time-limit truncation is not terminal.
    """
    return reward + gamma * (1.0 - terminated) * next_v


def trajectory_return(
    rewards: torch.Tensor,
    kl: torch.Tensor,
    alive: torch.Tensor,
    values: torch.Tensor,
    alpha: torch.Tensor | float,
    gamma: float,
    lam: float = 1.0,
) -> torch.Tensor:
    """The soft return of H-step trajectories (Eq. 6-7 with a leaf value), ``[B,N]``:

        G = Σ_{t<H} γ^t m_t (r_t − α KL_t) + γ^H m_H (V_H − α KL_H)

    Args:
        rewards: r_t, ``[H,B,N]``.
        kl: KL_t of the step-t policy to the prior (a closed form or log π/p of the
            sample, in the prior's ``kl_form``), ``[H+1,B,N]``; 0 where the action was
            given (a_0 of Q̂(s, a_0)).
        alive: m_t, the probability that no termination came before step t,
            ``[H+1,B,N]`` (m_0 = 1): a termination stops the sum.
        values: the leaf value Q̂(s_h, a_h), ``[B,N]`` for h = H only, or
            ``[H+1,B,N]`` for every h (needed when ``lam`` < 1).
        alpha: temperature α.
        gamma: discount γ.
        lam: λ of the λ-return over horizons 1..H: G^λ = (1−λ) Σ_{h<H} λ^{h−1} G^(h)
            + λ^{H−1} G^(H), with G^(h) the return truncated at h with the value at
            s_h; λ = 1 gives G = G^(H).
    """
    horizon = rewards.shape[0]
    steps = torch.arange(horizon + 1, dtype=alive.dtype, device=alive.device)
    discount = (gamma**steps)[:, None, None] * alive  # γ^t m_t, [H+1,B,N]
    step_terms = discount[:-1] * (rewards - alpha * kl[:-1])  # [H,B,N]
    if lam == 1.0 or horizon == 0:
        leaf = values if values.dim() == 2 else values[-1]
        return step_terms.sum(0) + discount[-1] * (leaf - alpha * kl[-1])
    if values.dim() != 3:
        raise ValueError("a λ-return (lam < 1) needs the value at every step, [H+1,B,N]")
    # Truncated returns G^(h), h = 1..H: the terms before h plus the value at s_h.
    g = torch.cumsum(step_terms, 0) + discount[1:] * (values[1:] - alpha * kl[1:])
    weights = (1.0 - lam) * lam ** steps[:-1]
    weights[-1] = lam ** (horizon - 1)
    return (weights[:, None, None] * g).sum(0)


def policy_kl(
    posterior: Posterior,
    prior: Prior,
    s: torch.Tensor,
    a: torch.Tensor,
    prior_dist: TanhGaussian | None = None,
    u: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(π(·|s) ‖ p_θ(·|s)) per state ``[B]``: in closed form when both are
    tanh-Gaussians; for weighted particles, their own estimate (from the proposal's
    density), or, for particles that carry none (resampled or moved), the KL of their
    moment-matched tanh-Gaussian; else the mean over the samples ``a`` [B,N,A] of
    log π(a) − log p(a).  ``u`` = atanh(a) [B,N,A], when the samples of a tanh-Gaussian
    ``posterior`` come with it: their densities are then read at u itself, exact where
    a saturates to ±1 in floating point and atanh(a) would have to be clamped."""
    if prior_dist is None:
        prior_dist = prior.distribution(s)
    if hasattr(posterior, "kl_to_prior"):  # weighted particles
        try:
            return posterior.kl_to_prior(prior, s)
        except NotImplementedError:
            posterior = posterior.moment_match()
            a, u = posterior.rsample(a.shape[-2])
    if prior_dist is not None:
        try:
            return posterior.kl(prior_dist)
        except NotImplementedError:
            pass
    if u is None:
        u, log_pi = atanh(a), posterior.log_prob(a)
    else:
        log_pi = posterior.log_prob_u(u)
    return (log_pi - prior.log_prob(s, a, u)).mean(-1)


def alpha_loss(log_alpha: torch.Tensor, kl: torch.Tensor, kl_target: float) -> torch.Tensor:
    """Temperature loss log α · (KL* − KL̂) (the ``kl`` α target): gradient descent
    raises α while the posterior's KL to the prior exceeds the target KL*, and lowers
    it otherwise.  ``kl`` [B] is treated as a constant.

    With the uniform prior and KL* = A(1 + log 2) this is exactly SAC's entropy-target
    loss (``entropy_alpha_loss`` with H* = −A).  Under any other prior it is not: it
    bounds the distance to the prior, not the posterior's entropy.
    """
    return (log_alpha * (kl_target - kl.detach())).mean()


def entropy_alpha_loss(
    log_alpha: torch.Tensor, log_pi: torch.Tensor, target_entropy: float
) -> torch.Tensor:
    """SAC's temperature loss (Haarnoja et al., 2018c, §5): −log α · (log π + H*),
    the bracket detached, averaged over ``log_pi`` (log π of sampled actions, [B]).
    Gradient descent raises α while the posterior's entropy −E[log π] is below the
    target H* (SAC's H* = −A), whatever the prior: the procedure §4.1 tunes α by."""
    return -(log_alpha * (log_pi + target_entropy).detach()).mean()


class TrajectoryObjective:
    """J̃(s, π) = E_{a~π}[Q̂(s,a)] − α KL(π(·|s,O) ‖ p_θ(·|s))  for fixed states: Eq. 16
    when Q̂ is a critic, Eq. 6-7 truncated at H when Q̂ is ``ModelBasedValue``'s
    H-step return (its future KL terms and rewards inside Q̂, KL_0 here).

    Args:
        states: ``[B, S]``.
        value: the value estimate, ``value(s [B,S], a [B,N,A]) -> [B,N]``.
        prior: the action prior; its KL is analytic when it is a tanh-Gaussian, else a
            sample estimate with the same samples as E[Q̂].
        alpha: temperature α > 0 (a detached scalar tensor or float).
    """

    def __init__(self, states: torch.Tensor, value: ValueFn, prior: Prior, alpha):
        self.states, self.value, self.prior, self.alpha = states, value, prior, alpha
        self.prior_dist = prior.distribution(states)
        # Set once a gradient engine has checked that Q̂ is differentiable in actions.
        self._value_differentiable = False

    @property
    def horizon(self) -> int:
        """H of the value estimate (0 for a model-free critic)."""
        return getattr(getattr(self.value, "func", self.value), "horizon", 0)

    def subset(self, rows: slice) -> TrajectoryObjective:
        """The same objective restricted to the states ``rows`` (the prior's tanh-Gaussian
        is sliced, not recomputed)."""
        part = copy.copy(self)
        part.states, dist = self.states[rows], self.prior_dist
        if dist is not None:
            part.prior_dist = TanhGaussian(dist.loc[rows], dist.log_scale[rows])
        return part

    def __call__(
        self, posterior: Posterior, n_samples: int, antithetic: bool = False
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """J̃ [B] for a posterior, estimated with ``n_samples`` actions (reparameterised
        for a tanh-Gaussian, in ± pairs when ``antithetic``), and metrics (``q`` [B],
        ``kl`` [B] in the prior's ``kl_form``, and for a tanh-Gaussian ``log_pi`` [B],
        the mean log π of the samples, which SAC's α loss reads; all detached)."""
        if not isinstance(posterior, TanhGaussian):
            a = posterior.sample(n_samples)
            kl = policy_kl(posterior, self.prior, self.states, a, self.prior_dist)
            q = self.value(self.states, a)
            return soft_objective(q, kl, self.alpha), {
                "q": q.mean(-1).detach(),
                "kl": kl.detach(),
            }
        a, u, log_pi = posterior.rsample_with_log_prob(n_samples, antithetic)
        if self.prior_dist is not None:
            kl = posterior.kl(self.prior_dist)
        else:
            kl = (log_pi - self.prior.log_prob(self.states, a, u)).mean(-1)
        q = self.value(self.states, a)
        j = soft_objective(q, kl, self.alpha)
        return j, {"q": q.mean(-1).detach(), "kl": kl.detach(), "log_pi": log_pi.mean(-1).detach()}

    def action_values(self, a: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
        """Q̂(s,a) + α log p_θ(a|s) for actions [B,N,A]: α times the log of the
        unnormalised Boltzmann posterior of Eq. 11, for non-parametric engines."""
        u = atanh(a) if u is None else u
        return self.value(self.states, a) + self.alpha * self.prior.log_prob(self.states, a, u)
