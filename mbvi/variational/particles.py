"""Weighted particles: the non-parametric posterior π(a|s,O) of the sampling planners
(importance sampling, SVGD, SMC, MPPI, CEM).

π(·|s) ≈ Σ_k w_k δ(a − a_k) with K particles a_k per state and self-normalised
weights w_k (Σ_k w_k = 1).  Shapes: B states, K particles, A action dims; particles
``[B,K,A]`` in [-1, 1]^A, log-weights ``[B,K]``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from mbvi.variational.distributions import (
    LOG_SCALE_MAX,
    LOG_SCALE_MIN,
    Posterior,
    TanhGaussian,
    atanh,
)


def normalise_log_weights(log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-normalise log-weights ``[B,K]`` (logsumexp over K becomes 0).

    NaN log-weights count as −inf (the particle is dropped) and +inf as the largest
    float (such particles share the weight).  A state whose weights all vanish has
    *collapsed*: it falls back to uniform weights, so its particles stay what the
    proposal drew (never a NaN action).  Returns ``(log_w [B,K], collapsed [B] bool)``.
    """
    log_w = torch.nan_to_num(
        log_w, nan=-math.inf, posinf=torch.finfo(log_w.dtype).max, neginf=-math.inf
    )
    collapsed = torch.isneginf(log_w).all(-1)
    log_w = torch.where(collapsed.unsqueeze(-1), torch.zeros_like(log_w), log_w)
    return log_w - log_w.logsumexp(-1, keepdim=True), collapsed


class WeightedParticles(Posterior):
    """K weighted actions per state.

    Args:
        particles: a_k, ``[B,K,A]`` in [-1, 1]^A.
        log_weights: unnormalised log-weights ``[B,K]``; normalised here, with the
            collapse fallback of ``normalise_log_weights``.
        proposal_log_prob: log q(a_k|s) of the proposal each particle was drawn from,
            ``[B,K]``, when the particles are a single importance-sampling draw; it is
            what ``kl`` needs.  None (e.g. after SMC resampling, or for SVGD's moved
            particles) leaves the KL without an estimate.
        pre_tanh: u_k with a_k = tanh(u_k), ``[B,K,A]``, when known exactly (tanh
            rounds large |u| to ±1, which ``atanh`` cannot undo).
        mode: what ``mean_action`` returns: ``mean`` (the weighted mean, MPPI's
            choice; it blurs separate modes) or ``best`` (the heaviest particle).
        collapsed: ``[B]`` bool, states whose weights collapsed earlier (an SMC step);
            or-ed with the collapse found here.

    Attributes:
        collapsed: ``[B]`` bool: states whose weights all vanished (−inf or NaN) and
            fell back to uniform weights over the proposal's particles.
    """

    reparameterised = False

    def __init__(
        self,
        particles: torch.Tensor,
        log_weights: torch.Tensor,
        proposal_log_prob: torch.Tensor | None = None,
        pre_tanh: torch.Tensor | None = None,
        mode: Literal["mean", "best"] = "mean",
        collapsed: torch.Tensor | None = None,
    ):
        if particles.dim() != 3 or log_weights.shape != particles.shape[:2]:
            raise ValueError(
                f"particles must be [B,K,A] and log_weights [B,K], got "
                f"{tuple(particles.shape)} and {tuple(log_weights.shape)}"
            )
        if mode not in ("mean", "best"):
            raise ValueError(f"mode must be 'mean' or 'best', got {mode!r}")
        self.particles, self.mode = particles, mode
        self.log_weights, found = normalise_log_weights(log_weights)
        self.collapsed = found if collapsed is None else found | collapsed
        self.proposal_log_prob, self.pre_tanh = proposal_log_prob, pre_tanh

    @property
    def action_dim(self) -> int:
        return self.particles.shape[-1]

    @property
    def n_particles(self) -> int:
        return self.particles.shape[1]

    @property
    def weights(self) -> torch.Tensor:
        """w_k, ``[B,K]``, summing to 1 over K."""
        return self.log_weights.exp()

    def ess(self) -> torch.Tensor:
        """Effective sample size 1 / Σ_k w_k², ``[B]``, between 1 and K."""
        return torch.exp(-torch.logsumexp(2.0 * self.log_weights, -1))

    def indices(self, n: int) -> torch.Tensor:
        """n particle indices per state drawn by weight (with replacement), ``[B,n]``:
        independent uniforms through the weights' CDF (what ``torch.multinomial``
        draws, without its per-call setup, which dominates when acting on one state)."""
        cdf = self.weights.cumsum(-1)
        w = self.log_weights
        u = torch.rand(w.shape[0], n, dtype=w.dtype, device=w.device) * cdf[:, -1:]
        # right=True: the first k with cdf_k > u, so zero-weight particles are skipped.
        return torch.searchsorted(cdf, u, right=True).clamp_max(w.shape[1] - 1)

    def sample(self, n: int) -> torch.Tensor:
        """n actions per state drawn by weight (with replacement), ``[B,n,A]``."""
        return take_particles(self.particles, self.indices(n))

    def mean_action(self) -> torch.Tensor:
        """The weighted mean, or the heaviest particle when ``mode='best'``, ``[B,A]``."""
        if self.mode == "best":
            return self.best_action()
        return (self.weights.unsqueeze(-1) * self.particles).sum(-2)

    def best_action(self) -> torch.Tensor:
        """The heaviest particle, ``[B,A]`` (a mode of the posterior)."""
        return take_particles(self.particles, self.log_weights.argmax(-1, keepdim=True))[:, 0]

    def log_prob(self, a: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            "WeightedParticles has no density: a sum of point masses; use kl() or "
            "moment_match() for a tanh-Gaussian summary"
        )

    def u(self) -> torch.Tensor:
        """Pre-tanh particles ``[B,K,A]`` (stored, else atanh of the actions)."""
        return self.pre_tanh if self.pre_tanh is not None else atanh(self.particles)

    def kl(self, other: Posterior) -> torch.Tensor:
        """KL(π ‖ other) ``[B]`` for a proposal-drawn population (``proposal_log_prob``).

        The particles stand for the density π(a) ∝ q(a) ŵ(a), and self-normalisation
        gives π(a_k) ≈ K w_k q(a_k), so

            KL(π ‖ p) = E_π[log π − log p] ≈ Σ_k w_k (log(K w_k) + log q(a_k) − log p(a_k)),

        consistent as K → ∞ (particles of zero weight add nothing).  Raises
        NotImplementedError when the proposal's density is unknown.
        """
        log_other = (
            other.log_prob_u(self.u())
            if isinstance(other, TanhGaussian)
            else other.log_prob(self.particles)
        )
        return self.kl_from_log_density(log_other)

    def kl_to_prior(self, prior, s: torch.Tensor) -> torch.Tensor:
        """KL(π ‖ p_θ(·|s)) ``[B]`` for any ``Prior`` (also one that is no tanh-Gaussian,
        e.g. uniform), by the estimator of ``kl``; states ``s`` [B,S]."""
        return self.kl_from_log_density(prior.log_prob(s, self.particles, self.u()))

    def kl_from_log_density(self, log_p: torch.Tensor) -> torch.Tensor:
        """The estimator of ``kl`` given log p(a_k) ``[B,K]``."""
        if self.proposal_log_prob is None:
            raise NotImplementedError(
                "these particles carry no proposal density (resampled or moved), so "
                "KL(π‖p) has no estimate; use moment_match().kl(p) as a summary"
            )
        k = self.n_particles
        w = self.weights
        terms = self.log_weights + math.log(k) + self.proposal_log_prob - log_p
        return torch.where(w > 0, w * terms, torch.zeros_like(w)).sum(-1)

    def moment_match(self) -> TanhGaussian:
        """The tanh-Gaussian fitted to the particles, ``[B,A]``: weighted mean and
        standard deviation of u = atanh(a).  It is argmin_q KL(π ‖ q) over
        tanh-Gaussians q (a weighted maximum-likelihood fit), i.e. what fitting a
        learned prior to this posterior (Eq. 7) asks for."""
        u, w = self.u(), self.weights.unsqueeze(-1)
        loc = (w * u).sum(-2)
        var = (w * (u - loc.unsqueeze(-2)).pow(2)).sum(-2)
        log_scale = 0.5 * torch.log(var.clamp_min(1e-30))
        return TanhGaussian(loc, log_scale.clamp(LOG_SCALE_MIN, LOG_SCALE_MAX))

    def detach(self) -> WeightedParticles:
        out = WeightedParticles.__new__(WeightedParticles)
        out.__dict__.update(
            {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()}
        )
        return out


def take_particles(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x ``[B,K,...]`` at particle indices ``idx`` [B,n] -> ``[B,n,...]``."""
    return x[torch.arange(x.shape[0], device=x.device).unsqueeze(-1), idx]
