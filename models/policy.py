"""Amortised inference networks λ = f_φ(·) that output tanh-Gaussian parameters."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mbvi.models.mlp import mlp
from mbvi.variational.distributions import LOG_SCALE_MAX

POLICY_LOG_SCALE_MIN = -5.0


class GaussianHead(nn.Module):
    """s [B,S] -> (loc [B,A], log_scale [B,A]) with log_scale squashed smoothly into
    [POLICY_LOG_SCALE_MIN, LOG_SCALE_MAX] (a hard clamp would kill its gradient)."""

    def __init__(self, in_dim: int, act_dim: int, hidden: Sequence[int]):
        super().__init__()
        self.net = mlp(in_dim, hidden, 2 * act_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, raw = self.net(x).chunk(2, dim=-1)
        half_range = 0.5 * (LOG_SCALE_MAX - POLICY_LOG_SCALE_MIN)
        log_scale = POLICY_LOG_SCALE_MIN + half_range * (torch.tanh(raw) + 1.0)
        return loc, log_scale
