"""The agent's optimiser: one fused Adam over every trained part."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def fused_adam(parts: Sequence[tuple[Sequence[torch.Tensor], float]]) -> torch.optim.Adam:
    """Adam over ``parts`` = [(parameters, learning rate), ...], one param group per
    distinct learning rate.

    One optimiser makes an update one backward pass and one step: the hot path.  Parts
    that share a learning rate share a group (the agent's defaults are all 3e-4): each
    group costs Adam a Python pass and a kernel launch, which is 40% of its step at
    SAC's sizes.  Empty parts are dropped; a learning rate of 0 freezes its part.
    """
    by_lr: dict[float, list[torch.Tensor]] = {}
    for params, lr in parts:
        by_lr.setdefault(float(lr), []).extend(params)
    groups = [{"params": params, "lr": lr} for lr, params in by_lr.items() if params]
    fused = all(p.is_floating_point() for g in groups for p in g["params"])
    return torch.optim.Adam(groups, fused=fused)
