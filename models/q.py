"""Q-function ensembles: Q_ψ(s, a) for E critics at once."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mbvi.models.mlp import EnsembleMLP


class QEnsemble(nn.Module):
    """E critics Q_ψe(s, a) as one batched MLP.

    ``forward(s [B,S], a [B,N,A], frozen)`` -> [E,B,N].
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int], members: int = 2):
        super().__init__()
        self.net = EnsembleMLP(members, obs_dim + act_dim, hidden, 1)

    def forward(self, s: torch.Tensor, a: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        b, n, _ = a.shape
        sa = torch.cat([s.unsqueeze(1).expand(b, n, s.shape[-1]), a], dim=-1)
        return self.net(sa.reshape(b * n, -1), frozen).view(-1, b, n)
