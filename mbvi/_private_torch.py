"""The only place mbvi touches torch's private names, each behind a probe with a plain
fallback, so that a torch release that renames one costs speed, never correctness.

- ``FUSED_ADAM``: ``torch._fused_adam_``, the kernel ``Adam(fused=True).step`` calls
  (used by ``mbvi.training.optim.adam_step``; None falls back to ``Adam.step``).
- ``OPTIMIZER_GLOBAL_HOOKS``: the global step-hook registries ``Adam.step`` honours
  (a None entry makes ``adam_step`` fall back to ``Adam.step``).
- ``add_``: ``torch._foreach_add_`` over a list of tensors, else a loop.
- ``polyak_``: ``torch._foreach_lerp_`` (one kernel per dtype and device for a whole
  network's target update), else a loop of ``Tensor.lerp_``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim import optimizer as _optimizer_module

FUSED_ADAM = getattr(torch, "_fused_adam_", None)
OPTIMIZER_GLOBAL_HOOKS = [
    getattr(_optimizer_module, name, None)
    for name in ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks")
]
_FOREACH_ADD = getattr(torch, "_foreach_add_", None)
_FOREACH_LERP = getattr(torch, "_foreach_lerp_", None)


def add_(tensors: list[torch.Tensor], value: float) -> None:
    """Add ``value`` to every tensor in place."""
    if _FOREACH_ADD is not None:
        _FOREACH_ADD(tensors, value)
    else:
        plain_add_(tensors, value)


def plain_add_(tensors: list[torch.Tensor], value: float) -> None:
    for t in tensors:
        t.add_(value)


@torch.no_grad()
def polyak_(targets: Iterable[torch.Tensor], sources: Iterable[torch.Tensor], tau: float) -> None:
    """targets ← targets + τ (sources − targets), in place (a Polyak average)."""
    targets, sources = list(targets), list(sources)
    if _FOREACH_LERP is not None:
        _FOREACH_LERP(targets, sources, tau)
    else:
        plain_polyak_(targets, sources, tau)


@torch.no_grad()
def plain_polyak_(targets: list[torch.Tensor], sources: list[torch.Tensor], tau: float) -> None:
    for t, s in zip(targets, sources, strict=True):
        t.lerp_(s, tau)
