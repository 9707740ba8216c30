"""A small world model with known transitions, for checking rollouts by hand."""

from __future__ import annotations

import torch
from torch import nn

from mbvi.variational.world_model import Step, WorldModel


class LinearWorld(WorldModel):
    """s' = s W + a B (+ noise_std · ε for ``ts1``), r = −‖s‖² − 0.1‖a‖²; terminated
    when s'_0 exceeds ``stop_above``.  W and B are parameters, so a test can check that
    inference never trains them."""

    def __init__(self, noise_std: float = 0.0, stop_above: float = float("inf")):
        super().__init__()
        self.noise_std, self.stop_above = noise_std, stop_above

    def build(self, obs_dim: int, act_dim: int, termination=None) -> None:
        super().build(obs_dim, act_dim)
        g = torch.Generator().manual_seed(3)
        self.W = nn.Parameter(
            0.9 * torch.eye(obs_dim) + 0.05 * torch.randn(obs_dim, obs_dim, generator=g)
        )
        self.B = nn.Parameter(0.5 * torch.randn(act_dim, obs_dim, generator=g))

    def step(self, s, a, propagation="ts1", generator=None) -> Step:
        nxt = s @ self.W + a @ self.B
        if propagation == "ts1" and self.noise_std > 0:
            nxt = nxt + self.noise_std * torch.randn_like(nxt)
        reward = -(s**2).sum(-1) - 0.1 * (a**2).sum(-1)
        return Step(nxt, reward, (nxt[..., 0] > self.stop_above).to(s.dtype))

    def hand_step(self, s, a):
        """The same transition, written out for a hand computation (no noise)."""
        return s @ self.W + a @ self.B, -(s**2).sum(-1) - 0.1 * (a**2).sum(-1)
