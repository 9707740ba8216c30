"""Action priors p_θ(a|s) (paper §3.2, Table 1 "prior" column).

A prior is an ``nn.Module`` built for the environment's sizes by ``build``.  It gives
``log_prob(s, a, u)`` for actions ``a = tanh(u)`` and, when it is itself a tanh-Gaussian,
``distribution(s)`` so that the KL of Eq. 16 can be taken in closed form and iterative
engines can start from it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mbvi.distributions import TanhGaussian

_LOG_2 = math.log(2.0)


class Prior(nn.Module):
    """Base class of action priors on [-1, 1]^A."""

    obs_dim: int
    act_dim: int

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

    def default_kl_target(self) -> float:
        """KL(π‖p) per action dimension that α is tuned towards (``objectives.alpha_loss``)."""
        return 1.0

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
    """p(a) = Uniform([-1, 1]^A): SAC's prior, so KL(π‖p) = -H(π) + A log 2."""

    def log_prob(self, s: torch.Tensor, a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.full(a.shape[:-1], -a.shape[-1] * _LOG_2, dtype=a.dtype, device=a.device)

    def default_kl_target(self) -> float:
        # SAC's entropy target H* = -A, written as a KL target: KL* = -H* + A log 2.
        return 1.0 + _LOG_2


class ConstantTanhGaussianPrior(Prior):
    """p(a) = tanh(N(loc, scale^2)) independent of the state (paper §4.1).

    Args:
        loc: mean of the pre-tanh Gaussian, shared by every action dimension.
        scale: standard deviation of the pre-tanh Gaussian.
    """

    def __init__(self, loc: float = 0.0, scale: float = 1.0):
        super().__init__()
        if scale <= 0:
            raise ValueError(f"ConstantTanhGaussianPrior scale must be > 0, got {scale}")
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
