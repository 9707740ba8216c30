"""Action priors p_θ(a|s) (paper §3.2, Table 1 "prior" column).

A prior is an ``nn.Module`` built for the environment's sizes by ``build``.  It gives
``log_prob(s, a, u)`` for actions ``a = tanh(u)`` and, when it is itself a tanh-Gaussian,
``distribution(s)`` so that the KL of Eq. 16 can be taken in closed form and iterative
engines can start from it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from mbvi._private_torch import polyak_
from mbvi.errors import ConfigError
from mbvi.models.prior_net import PriorNet
from mbvi.variational.distributions import TanhGaussian

_LOG_2 = math.log(2.0)

KLForm = Literal["entropy", "kl"]
"""How the objective's KL terms read a prior whose density is the same everywhere on
[-1, 1]^A (``Prior.set_kl_form``): ``kl`` is Eq. 7's log π − log p; ``entropy`` drops
the constant log p, as §3.2.1 does to reach Eq. 12 (SAC's entropy bonus)."""


class Prior(nn.Module):
    """Base class of action priors on [-1, 1]^A."""

    obs_dim: int
    act_dim: int
    kl_form: KLForm = "kl"
    """Set by ``set_kl_form``; only a prior of constant density can take ``entropy``."""
    constant_density: bool = False
    """True when p(a|s) is the same for every action in the box (the uniform prior)."""

    def set_kl_form(self, form: KLForm | None) -> None:
        """Choose how ``log_prob`` enters the objective's KL terms: ``kl`` (Eq. 7), or
        ``entropy``, which drops a constant log-density (Eq. 12) so that KL(π‖p) reads
        E_π[log π] = −H(π); None picks ``entropy`` for a prior of constant density and
        ``kl`` for any other.  Raises ConfigError for ``entropy`` on a prior whose
        log-density depends on the action: it has no constant to drop."""
        if form is None:
            form = "entropy" if self.constant_density else "kl"
        if form not in ("entropy", "kl"):
            raise ConfigError(f"kl_form must be 'entropy' or 'kl', got {form!r}")
        if form == "entropy" and not self.constant_density:
            raise ConfigError(
                f"kl_form='entropy' drops a prior's constant log-density (SAC's entropy bonus "
                f"under the uniform prior), but {type(self).__name__}'s density depends on the "
                "action, so there is nothing constant to drop; use --model.kl_form kl (or "
                "leave it unset), or mbvi.UniformPrior for SAC's entropy form."
            )
        self.kl_form = form

    def dropped_log_density(self) -> float:
        """The constant log p(a) the objective leaves out of its KL terms: −A log 2 for
        the uniform prior in the ``entropy`` form, 0 in the ``kl`` form.  A KL term
        then equals KL(π‖p) + this (E_π[log π] for the uniform prior)."""
        return 0.0

    def build(self, obs_dim: int, act_dim: int) -> None:
        """Create parameters for the environment's sizes (called once by the agent)."""
        self.obs_dim, self.act_dim = obs_dim, act_dim

    def distribution(self, s: torch.Tensor) -> TanhGaussian | None:
        """The prior as a tanh-Gaussian ``[B, A]``, or None when it is not one."""
        return None

    def log_prob(self, s: torch.Tensor, a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """log p_θ(a|s) for actions ``a`` [B,N,A] (pre-tanh ``u``) -> [B,N]."""
        dist = self.distribution(s)
        if dist is None:
            raise NotImplementedError(f"{type(self).__name__} must implement log_prob")
        return dist.log_prob_u(u)

    def sample(self, s: torch.Tensor, n: int) -> torch.Tensor:
        """n actions per state from p_θ(·|s) for states ``s`` [B,S] -> ``[B, n, A]``
        (future actions of a model rollout that follows the prior; proposals)."""
        dist = self.distribution(s)
        if dist is None:
            raise NotImplementedError(f"{type(self).__name__} must implement sample")
        return dist.sample(n)

    def default_kl_target(self) -> float:
        """KL(π‖p) per action dimension that α is tuned towards (``objectives.alpha_loss``)."""
        return 1.0

    def min_kl_target(self) -> float:
        """The least KL(π‖p) per action dimension a tanh-Gaussian π can reach: a target
        at or below it cannot be met (α would grow without bound)."""
        return 0.0

    def min_kl_basis(self) -> str:
        """How ``min_kl_target`` was found, for the error that quotes it: the words
        before "than <floor> nats per dimension"."""
        return "no tanh-Gaussian posterior gets closer to it"

    # ---- M-step hooks: fixed priors keep these defaults -------------------------------
    learnable: bool = False
    """True when the prior has parameters fitted in the M-step (then ``loss`` is called)."""

    def loss(
        self, s: torch.Tensor, posterior: TanhGaussian
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """M-step loss for θ given the (detached) posterior at states ``s`` [B,S]:
        maximising J w.r.t. θ is minimising E_s[KL(π(·|s,O) ‖ p_θ(·|s))] (Eq. 7)."""
        raise NotImplementedError(f"{type(self).__name__} has no parameters to learn")

    def update_target(self) -> None:
        """Called after every optimizer step (e.g. a Polyak-averaged target copy)."""


class UniformPrior(Prior):
    """p(a) = Uniform([-1, 1]^A): SAC's prior, so KL(π‖p) = -H(π) + A log 2.

    In the ``entropy`` form (``set_kl_form``; the agent's default for this prior)
    ``log_prob`` is 0: the objective's KL terms are E_π[log π] = −H(π), SAC's entropy
    bonus, without Eq. 7's per-step constant A log 2.
    """

    constant_density = True

    def dropped_log_density(self) -> float:
        return -self.act_dim * _LOG_2 if self.kl_form == "entropy" else 0.0

    def sample(self, s: torch.Tensor, n: int) -> torch.Tensor:
        shape = (*s.shape[:-1], n, self.act_dim)
        return torch.rand(shape, dtype=s.dtype, device=s.device) * 2.0 - 1.0

    def log_prob(self, s: torch.Tensor, a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        log_p = 0.0 if self.kl_form == "entropy" else -a.shape[-1] * _LOG_2
        return torch.full(a.shape[:-1], log_p, dtype=a.dtype, device=a.device)

    def default_kl_target(self) -> float:
        # SAC's entropy target H* = -A, written as a KL target: KL* = -H* + A log 2.
        return 1.0 + _LOG_2

    def min_kl_target(self) -> float:
        # No tanh-Gaussian is uniform: the widest (μ_u = 0, σ_u ≈ 0.874) has entropy
        # 0.68364 nats per dimension against log 2 = 0.69315 (a test integrates it).
        return UNIFORM_MIN_KL_PER_DIM


UNIFORM_MIN_KL_PER_DIM = 0.00951
"""min over tanh-Gaussians π of KL(π‖uniform on [-1, 1]) per dimension, in nats."""


class ConstantTanhGaussianPrior(Prior):
    """p(a) = tanh(N(loc, scale^2)) independent of the state (paper §4.1).

    Args:
        loc: mean of the pre-tanh Gaussian, shared by every action dimension.
        scale: standard deviation of the pre-tanh Gaussian.
    """

    def __init__(self, loc: float = 0.0, scale: float = 1.0):
        super().__init__()
        if scale <= 0:
            raise ConfigError(f"ConstantTanhGaussianPrior scale must be > 0, got {scale}")
        self.loc, self.scale = loc, scale

    def build(self, obs_dim: int, act_dim: int) -> None:
        super().build(obs_dim, act_dim)
        self.register_buffer("_loc", torch.full((act_dim,), float(self.loc)))
        self.register_buffer("_log_scale", torch.full((act_dim,), math.log(self.scale)))

    def distribution(self, s: torch.Tensor) -> TanhGaussian:
        shape = (*s.shape[:-1], self.act_dim)
        return TanhGaussian(self._loc.expand(shape), self._log_scale.expand(shape))

    def default_kl_target(self) -> float:
        # The same per-dimension budget as SAC's: a posterior may move about as far
        # from the prior as SAC's policy moves from the uniform one.
        return 1.0 + _LOG_2


# Bounds of log η for the trust-region multipliers: the floor keeps a multiplier that
# went slack able to act again within a few hundred updates.
_LOG_ETA_MIN, _LOG_ETA_MAX = math.log(1e-3), math.log(1e6)
LOG_ETA_BOUNDS = (_LOG_ETA_MIN, _LOG_ETA_MAX)
"""Bounds of log η of a trust-region multiplier (LearnedPrior; learnable ProgramPrior)."""


class LearnedPrior(Prior):
    """p_θ(a|s) = tanh(N(μ_θ(s), σ_θ(s)^2)) fitted to the posterior in the M-step (Eq. 7),
    inside MPO's decoupled KL trust regions (Abdolmaleki et al., 2018, Eq. 13) around a
    Polyak-averaged target copy p̄ (Table 1: "learned prior").

    E-step: ``distribution(s)`` is the target p̄, computed without gradients, so the
    engine's loss never reaches θ and prior and posterior cannot chase each other within
    one update.  M-step (``loss``), with all KLs averaged over the batch of states::

        L(θ, η) = KL(π ‖ p_θ)                                 fit the posterior (Eq. 7)
                + sg(η_μ) KL_μ + sg(η_σ) KL_σ                  trust regions, θ's side
                + η_μ (ε_μ − sg(KL_μ)/A) + η_σ (ε_σ − sg(KL_σ)/A)   dual ascent on η

        KL_μ = KL(p̄ ‖ N(μ_θ, σ̄))    (how far the mean moved)
        KL_σ = KL(p̄ ‖ N(μ̄, σ_θ))    (how far the scale moved)

    where sg stops gradients.  Descending the last line raises η while its constraint
    KL/A ≤ ε is violated and lowers it otherwise; the middle line makes a large η pull
    p_θ back towards p̄.  The bounds are per action dimension so that one ε fits every
    environment.  The target follows p_θ by p̄ ← (1−τ) p̄ + τ p_θ in ``update_target``,
    so p̄ moves by about ε_μ, ε_σ per 1/τ updates.

    The agent trains every parameter of a prior with one Adam learning rate
    (``prior_lr``), and Adam moves each parameter by about its learning rate per step,
    far too slowly for a multiplier that must span decades.  So η = exp(k·ρ) with
    ``k = dual_lr_scale``: Adam moves log η by about ``dual_lr_scale · prior_lr`` per
    update (3e-4 · 30 ≈ 0.01, MPO's dual learning rate).

    Args:
        hidden: widths of the prior network's hidden layers.
        init_scale: pre-tanh standard deviation of p_θ at every state before training.
        tau: Polyak factor of the target, p̄ ← (1−τ) p̄ + τ p_θ, in (0, 1].
        eps_mean: bound ε_μ on KL_μ per action dimension (mean trust region), > 0.
        eps_scale: bound ε_σ on KL_σ per action dimension (scale trust region), > 0;
            much smaller than ``eps_mean`` so that the prior's scale, and with it the
            posterior's, does not collapse before Q̂ is any good.
        init_eta_mean: initial multiplier η_μ of the mean trust region, > 0.
        init_eta_scale: initial multiplier η_σ of the scale trust region, > 0.
        dual_lr_scale: k in η = exp(k·ρ): log η moves about k × ``prior_lr`` per update.
    """

    learnable = True

    def __init__(
        self,
        hidden: Sequence[int] = (256, 256),
        init_scale: float = 1.0,
        tau: float = 0.005,
        eps_mean: float = 0.05,
        eps_scale: float = 1e-4,
        init_eta_mean: float = 1.0,
        init_eta_scale: float = 10.0,
        dual_lr_scale: float = 30.0,
    ):
        super().__init__()
        checks = [
            ("tau", tau, 0.0 < tau <= 1.0, "in (0, 1]"),
            ("eps_mean", eps_mean, eps_mean > 0, "> 0"),
            ("eps_scale", eps_scale, eps_scale > 0, "> 0"),
            ("init_scale", init_scale, init_scale > 0, "> 0"),
            ("init_eta_mean", init_eta_mean, init_eta_mean > 0, "> 0"),
            ("init_eta_scale", init_eta_scale, init_eta_scale > 0, "> 0"),
            ("dual_lr_scale", dual_lr_scale, dual_lr_scale > 0, "> 0"),
        ]
        for name, value, ok, expected in checks:
            if not ok:
                raise ConfigError(f"LearnedPrior {name} must be {expected}, got {value}")
        self.hidden, self.init_scale, self.tau = tuple(hidden), init_scale, tau
        self.eps_mean, self.eps_scale = eps_mean, eps_scale
        self.init_eta_mean, self.init_eta_scale = init_eta_mean, init_eta_scale
        self.dual_lr_scale = dual_lr_scale

    def build(self, obs_dim: int, act_dim: int) -> None:
        super().build(obs_dim, act_dim)
        self.net = PriorNet(obs_dim, act_dim, self.hidden, self.init_scale)
        self.target_net = copy.deepcopy(self.net).requires_grad_(False)
        k = self.dual_lr_scale
        self.rho_mean = nn.Parameter(torch.tensor(math.log(self.init_eta_mean) / k))
        self.rho_scale = nn.Parameter(torch.tensor(math.log(self.init_eta_scale) / k))

    def distribution(self, s: torch.Tensor) -> TanhGaussian:
        """The target prior p̄(·|s) ``[B, A]``, a constant for the E-step."""
        with torch.no_grad():
            return TanhGaussian(*self.target_net(s))

    def online_distribution(self, s: torch.Tensor) -> TanhGaussian:
        """The trained prior p_θ(·|s) ``[B, A]`` (differentiable in θ)."""
        return TanhGaussian(*self.net(s))

    def etas(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The multipliers (η_μ, η_σ), differentiable in ρ."""
        k = self.dual_lr_scale
        return (k * self.rho_mean).exp(), (k * self.rho_scale).exp()

    def default_kl_target(self) -> float:
        # SAC's 1 + log 2 against the uniform prior pays for the posterior's absolute
        # narrowness.  A learned prior absorbs what the posterior has learned (its mean,
        # and its scale within ε_σ), so KL(π‖p̄) only measures how far the posterior
        # departs from the slowly moving prior between prior updates: the role of MPO's
        # E-step bound ε, not of an entropy floor.  0.5 nats per dimension lets the
        # posterior shift its mean by one prior standard deviation, or be ~0.4x as wide
        # as the prior: enough to act on Q̂ while the prior catches up, without tying
        # the posterior to a prior that moves only ε per 1/τ updates.  Override it with
        # the agent's ``target_kl_per_dim``.
        return 0.5

    def loss(
        self, s: torch.Tensor, posterior: TanhGaussian
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """M-step loss L(θ, η) for states ``s`` [B,S] and the posterior π(·|s,O) there
        (treated as a constant).  Metrics (0-dim, detached): ``kl_posterior`` =
        E_s KL(π‖p_θ) (summed over action dims, like ``train/kl``); ``kl_mean``,
        ``kl_scale`` = KL_μ/A, KL_σ/A (per dim, compare with ``eps_mean``,
        ``eps_scale``); ``eta_mean``, ``eta_scale``."""
        posterior = posterior.detach()
        online, target = self.online_distribution(s), self.distribution(s)
        kl_posterior = posterior.kl(online).mean()
        kl_mean = target.kl(TanhGaussian(online.loc, target.log_scale)).mean()
        kl_scale = target.kl(TanhGaussian(target.loc, online.log_scale)).mean()
        eta_mean, eta_scale = self.etas()
        a = self.act_dim
        trust = eta_mean.detach() * kl_mean + eta_scale.detach() * kl_scale
        dual = eta_mean * (self.eps_mean - kl_mean.detach() / a) + eta_scale * (
            self.eps_scale - kl_scale.detach() / a
        )
        metrics = {
            "kl_posterior": kl_posterior.detach(),
            "kl_mean": kl_mean.detach() / a,
            "kl_scale": kl_scale.detach() / a,
            "eta_mean": eta_mean.detach(),
            "eta_scale": eta_scale.detach(),
        }
        return kl_posterior + trust + dual, metrics

    @torch.no_grad()
    def update_target(self) -> None:
        """p̄ ← (1−τ) p̄ + τ p_θ, and keep log η within its bounds (projected ascent)."""
        polyak_(self.target_net.parameters(), self.net.parameters(), self.tau)
        k = self.dual_lr_scale
        for rho in (self.rho_mean, self.rho_scale):
            rho.clamp_(_LOG_ETA_MIN / k, _LOG_ETA_MAX / k)
