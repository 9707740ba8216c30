"""Termination of imagined transitions, per env.

| env | termination |
|---|---|
| Pendulum, HalfCheetah, Swimmer, Reacher, Pusher | never (``NeverTerminates``) |
| Hopper, Walker2d, Ant, Humanoid, InvertedPendulum, InvertedDoublePendulum | learned head (rules not yet built) |
| anything else | learned head (``DynamicsEnsemble(learned_termination=True)``) |
"""

from __future__ import annotations

import torch
from torch import nn

NEVER = ("Pendulum", "HalfCheetah", "Swimmer", "Reacher", "Pusher")


class NeverTerminates(nn.Module):
    """d = 0 for every row."""

    def forward(self, s: torch.Tensor, a: torch.Tensor, s_next: torch.Tensor) -> torch.Tensor:
        return s.new_zeros(s.shape[0])


def termination_for_env(env) -> tuple[nn.Module | None, str]:
    """(termination module or None, kind: ``never``, ``rule`` or ``learned``)."""
    name = env.spec.id.split("-")[0] if env.spec is not None else ""
    if name in NEVER:
        return NeverTerminates(), "never"
    return None, "learned"
