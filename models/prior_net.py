"""The network of a learned action prior p_θ(a|s): a state-dependent tanh-Gaussian."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mbvi.errors import ConfigError
from mbvi.models.policy import POLICY_LOG_SCALE_MIN, GaussianHead
from mbvi.variational.distributions import LOG_SCALE_MAX


class PriorNet(GaussianHead):
    """s [B,S] -> (loc [B,A], log_scale [B,A]) of p_θ(a|s), starting out as the same
    tanh(N(0, init_scale^2)) at every state.

    A prior sets how much each action costs the posterior (Eq. 16), so it should start
    broad rather than at whatever a random output layer gives: the output layer's
    weights start at zero and its bias at (0, log init_scale).  The hidden layers get
    gradients from the first update on, through the output weights.

    Args:
        in_dim: state dimension S.
        act_dim: action dimension A.
        hidden: widths of the hidden layers.
        init_scale: initial pre-tanh standard deviation (1.0 puts a tanh-Gaussian's
            mass over most of [-1, 1]).
    """

    def __init__(self, in_dim: int, act_dim: int, hidden: Sequence[int], init_scale: float = 1.0):
        super().__init__(in_dim, act_dim, hidden)
        lo, hi = POLICY_LOG_SCALE_MIN, LOG_SCALE_MAX
        log_scale = math.log(init_scale)
        if not lo < log_scale < hi:
            raise ConfigError(
                f"PriorNet init_scale must lie in (exp({lo}), exp({hi})), got {init_scale}"
            )
        # Invert GaussianHead's squash log_scale = lo + (hi - lo)/2 · (tanh(raw) + 1).
        raw = math.atanh(2.0 * (log_scale - lo) / (hi - lo) - 1.0)
        out = self.net[-1]
        with torch.no_grad():
            out.weight.zero_()
            out.bias[:act_dim] = 0.0
            out.bias[act_dim:] = raw
