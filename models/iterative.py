"""The iterative inference network of paper Eq. 15 (Marino et al., 2018b)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mbvi.models.mlp import mlp
from mbvi.models.policy import POLICY_LOG_SCALE_MIN
from mbvi.variational.distributions import LOG_SCALE_MAX


class IterativeUpdate(nn.Module):
    """f_φ and ω_φ of Eq. 15 as one MLP with ``4·A`` extra inputs and outputs (§4.1).

    ``forward(s [B,S], features [B,F])`` -> ``(f_loc, f_log_scale, gate_loc,
    gate_log_scale)``, each ``[B,A]``.  ``features`` are the current parameters and
    their objective gradients, already normalised by the engine.  ``f_log_scale`` is
    squashed smoothly into [POLICY_LOG_SCALE_MIN, LOG_SCALE_MAX] like ``GaussianHead``;
    the gates are sigmoids in [0, 1].

    Args:
        obs_dim: state size S.
        feature_dim: size F of the per-state feature vector (4·A in the paper).
        act_dim: action size A.
        hidden: widths of the hidden layers.
    """

    def __init__(self, obs_dim: int, feature_dim: int, act_dim: int, hidden: Sequence[int]):
        super().__init__()
        self.net = mlp(obs_dim + feature_dim, hidden, 4 * act_dim)

    def forward(
        self, s: torch.Tensor, features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        f_loc, raw_scale, gate_loc, gate_scale = self.net(torch.cat([s, features], -1)).chunk(
            4, dim=-1
        )
        half_range = 0.5 * (LOG_SCALE_MAX - POLICY_LOG_SCALE_MIN)
        f_log_scale = POLICY_LOG_SCALE_MIN + half_range * (torch.tanh(raw_scale) + 1.0)
        return f_loc, f_log_scale, torch.sigmoid(gate_loc), torch.sigmoid(gate_scale)
