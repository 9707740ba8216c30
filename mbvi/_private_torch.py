"""The only place mbvi touches torch's private names, each behind a probe with a plain
fallback, so that a torch release that renames one costs speed, never correctness.

- ``FUSED_ADAM``: ``torch._fused_adam_``, the kernel ``Adam(fused=True).step`` calls
  (used by ``mbvi.training.optim.adam_step``; None falls back to ``Adam.step``).
- ``OPTIMIZER_GLOBAL_HOOKS``: the global step-hook registries ``Adam.step`` honours
  (a None entry makes ``adam_step`` fall back to ``Adam.step``).
- ``add_``: ``torch._foreach_add_`` over a list of tensors, else a loop.
- ``polyak_``: ``torch._foreach_lerp_`` (one kernel per dtype and device for a whole
  network's target update), else a loop of ``Tensor.lerp_``.
- ``linear_relu``: ``torch.ops.mkldnn._linear_pointwise``, one oneDNN matmul with the
  bias and ReLU as post-ops (CPU float32, used by the critics' frozen fast path once a
  probe agrees with plain torch), else addmm and ReLU.
- ``relu_backward_``: ``aten.threshold_backward.grad_input``, ReLU's own backward kernel
  writing into the activations' storage, else ``masked_fill`` and a copy.
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
LINEAR_RELU_OP = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
_THRESHOLD_BACKWARD = getattr(torch.ops.aten.threshold_backward, "grad_input", None)


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


def linear_relu(x: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """relu(x @ w_tᵀ + bias), x [R,in], w_t [out,in], bias [out]: one oneDNN primitive
    where ``linear_relu_fused(x)`` holds, else ``plain_linear_relu``."""
    if linear_relu_fused(x):
        return LINEAR_RELU_OP(x, w_t, bias, "relu", [None], "")
    return plain_linear_relu(x, w_t, bias)


def plain_linear_relu(x: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.addmm(bias, x, w_t.t()).relu_()


_LINEAR_RELU_OK: bool | None = None  # the probe's verdict, taken on first use


def linear_relu_fused(x: torch.Tensor) -> bool:
    """Whether ``linear_relu`` on tensors like ``x`` runs the fused oneDNN op: CPU float32
    on a build whose op exists and agrees with plain torch (probed once)."""
    global _LINEAR_RELU_OK
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    if _LINEAR_RELU_OK is None:
        _LINEAR_RELU_OK = _probe_linear_relu()
    return _LINEAR_RELU_OK


def _probe_linear_relu() -> bool:
    if LINEAR_RELU_OP is None or not torch.backends.mkldnn.is_available():
        return False
    g = torch.Generator().manual_seed(0)
    x, w_t, b = (torch.randn(*shape, generator=g) for shape in ((5, 7), (3, 7), (3,)))
    try:
        fused = LINEAR_RELU_OP(x, w_t, b, "relu", [None], "")
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return torch.allclose(fused, plain_linear_relu(x, w_t, b), atol=1e-5)


def relu_backward_(grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``grad`` where the ReLU output ``out`` is positive, else 0, written into ``out``
    and returned (``out`` is consumed)."""
    if _RELU_BACKWARD_OK:
        return _THRESHOLD_BACKWARD(grad, out, 0.0, grad_input=out)
    return plain_relu_backward_(grad, out)


def plain_relu_backward_(grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return out.copy_(grad.masked_fill(out <= 0, 0.0))


def _probe_relu_backward() -> bool:
    if _THRESHOLD_BACKWARD is None:
        return False
    grad, out = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 0.0, 2.0])
    try:
        got = _THRESHOLD_BACKWARD(grad, out.clone(), 0.0, grad_input=out.clone())
    except (AttributeError, RuntimeError, NotImplementedError, TypeError):
        return False
    return torch.equal(got, torch.tensor([1.0, 0.0, 3.0]))


_RELU_BACKWARD_OK = _probe_relu_backward()
