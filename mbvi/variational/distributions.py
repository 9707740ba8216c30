"""The posterior contract, and the tanh-Gaussian (paper Eq. 13-14) that parametric
posteriors and priors use.

Shapes: B states, N samples, A action dims; ``loc`` and ``log_scale`` are ``[B, A]``;
samples are ``[B, N, A]``; log-probs ``[B, N]``.  Everything is plain torch so the hot
path never pays for ``torch.distributions`` argument validation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_LOG_2 = math.log(2.0)
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
LOG_SCALE_MIN, LOG_SCALE_MAX = -10.0, 2.0


def tanh_log_det(u: torch.Tensor) -> torch.Tensor:
    """log|d tanh(u)/du| summed over the last dim, stable for large |u|.

    Uses log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)), which never evaluates
    ``1 - tanh(u)^2`` (that underflows to 0 for |u| > 9 in float32).
    """
    return (2.0 * (_LOG_2 - u - F.softplus(-2.0 * u))).sum(-1)


def gaussian_log_prob(u: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Diagonal Gaussian log density of ``u`` [B,N,A] under loc/log_scale [B,A] -> [B,N]."""
    z = (u - loc.unsqueeze(-2)) * torch.exp(-log_scale).unsqueeze(-2)
    return (-0.5 * z.pow(2) - log_scale.unsqueeze(-2) - _HALF_LOG_2PI).sum(-1)


def atanh(a: torch.Tensor) -> torch.Tensor:
    """Inverse of tanh with the action clipped just inside (-1, 1).

    Actions that tanh rounded to ±1 lose their pre-tanh value; when the sample ``u`` is
    at hand, use ``TanhGaussian.log_prob_u`` instead.
    """
    eps = torch.finfo(a.dtype).eps
    a = a.clamp(-1.0 + eps, 1.0 - eps)
    return 0.5 * (torch.log1p(a) - torch.log1p(-a))


class Posterior:
    """What every approximate posterior π(a|s,O) over [-1, 1]^A offers, for B states.

    The agent acts, evaluates and builds TD targets through these methods only, so a
    non-parametric posterior (weighted particles) serves wherever a tanh-Gaussian does.
    """

    reparameterised: bool = False
    """True when ``sample`` is differentiable in the posterior's parameters."""

    @property
    def action_dim(self) -> int:
        raise NotImplementedError

    def sample(self, n: int) -> torch.Tensor:
        """n actions per state, ``[B, n, A]``."""
        raise NotImplementedError

    def log_prob(self, a: torch.Tensor) -> torch.Tensor:
        """log π(a|s,O) for actions ``a`` [B,N,A] -> [B,N]."""
        raise NotImplementedError(f"{type(self).__name__} has no density")

    def mean_action(self) -> torch.Tensor:
        """The action used in evaluation, ``[B, A]``."""
        raise NotImplementedError

    def kl(self, other: TanhGaussian) -> torch.Tensor:
        """KL(self ‖ other) in closed form, ``[B]``; NotImplementedError where none
        exists (callers then estimate it from samples)."""
        raise NotImplementedError(f"{type(self).__name__} has no closed-form KL")

    def detach(self) -> Posterior:
        return self


class TanhGaussian(Posterior):
    """a = tanh(u), u ~ N(loc, diag(exp(log_scale)^2))  (Eq. 13-14).

    Args:
        loc: mean of u, ``[B, A]``.
        log_scale: log standard deviation of u, ``[B, A]``; clamped to
            [LOG_SCALE_MIN, LOG_SCALE_MAX] by whoever produces it.
    """

    def __init__(self, loc: torch.Tensor, log_scale: torch.Tensor):
        if loc.shape != log_scale.shape:
            raise ValueError(
                f"loc and log_scale must have the same shape, got {tuple(loc.shape)} "
                f"and {tuple(log_scale.shape)}"
            )
        self.loc = loc
        self.log_scale = log_scale

    @property
    def action_dim(self) -> int:
        return self.loc.shape[-1]

    def standard_normal(self, n: int, antithetic: bool = False) -> torch.Tensor:
        """ε ~ N(0, I), ``[B, n, A]``.  ``antithetic`` draws n/2 and appends −ε (n even):
        the pairs cancel the odd terms of a Taylor expansion of f(loc + σε), which
        lowers the variance of reparameterised gradients of smooth objectives."""
        shape = (*self.loc.shape[:-1], n, self.loc.shape[-1])
        kw = {"dtype": self.loc.dtype, "device": self.loc.device}
        if not antithetic:
            return torch.randn(shape, **kw)
        if n % 2:
            raise ValueError(f"antithetic sampling needs an even number of samples, got {n}")
        half = torch.randn((*shape[:-2], n // 2, shape[-1]), **kw)
        return torch.cat([half, -half], dim=-2)

    def transform(self, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, u) = (tanh(u), loc + σ ε) for standard-normal ``eps`` [B,N,A]."""
        u = self.loc.unsqueeze(-2) + self.log_scale.exp().unsqueeze(-2) * eps
        return torch.tanh(u), u

    reparameterised = True

    def sample(self, n: int) -> torch.Tensor:
        """n reparameterised actions per state, ``[B, n, A]``."""
        return self.rsample(n)[0]

    def rsample(self, n: int, antithetic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterised samples: returns (a, u), both ``[B, n, A]``."""
        return self.transform(self.standard_normal(n, antithetic))

    def rsample_with_log_prob(
        self, n: int, antithetic: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``rsample`` plus log π(a) [B,n], reusing the standard-normal draws (cheaper
        than ``log_prob_u`` on the samples: the hot path of sample-based KL)."""
        eps = self.standard_normal(n, antithetic)
        a, u = self.transform(eps)
        log_gauss = (-0.5 * eps.pow(2) - _HALF_LOG_2PI).sum(-1) - self.log_scale.sum(
            -1, keepdim=True
        )
        return a, u, log_gauss - tanh_log_det(u)

    def log_prob_u(self, u: torch.Tensor) -> torch.Tensor:
        """log π(a) for a = tanh(u), given the pre-tanh sample ``u`` [B,N,A] -> [B,N]."""
        return gaussian_log_prob(u, self.loc, self.log_scale) - tanh_log_det(u)

    def log_prob(self, a: torch.Tensor) -> torch.Tensor:
        """log π(a) for actions ``a`` [B,N,A] in (-1, 1) -> [B,N] (inverts tanh)."""
        return self.log_prob_u(atanh(a))

    def mean_action(self) -> torch.Tensor:
        """tanh(loc): the deterministic action used in evaluation, ``[B, A]``."""
        return torch.tanh(self.loc)

    def kl(self, other: TanhGaussian) -> torch.Tensor:
        """KL(self ‖ other) in closed form, ``[B]``.

        tanh is a bijection, so the KL of two tanh-Gaussians equals the KL of their
        underlying Gaussians.
        """
        var_ratio = torch.exp(2.0 * (self.log_scale - other.log_scale))
        mean_term = ((self.loc - other.loc) * torch.exp(-other.log_scale)).pow(2)
        return 0.5 * (var_ratio + mean_term - 1.0 - torch.log(var_ratio)).sum(-1)

    def detach(self) -> TanhGaussian:
        return TanhGaussian(self.loc.detach(), self.log_scale.detach())
