"""Multi-layer perceptrons, plain and ensembled (E members as one batched matmul)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class _MaskFreeReLU(torch.autograd.Function):
    """max(x, 0) whose backward scales the gradient by sign(output), a float 0 or 1.

    ReLU's own backward compares with 0, and under ``torch.compile`` that comparison
    becomes a bool mask saved between forward and backward.  Inductor's CPU code
    converts float masks to and from bool far more slowly than it runs float
    arithmetic, which made a compiled SAC update slower than the eager one (figures in
    docs/performance.md).  Same values and gradients as ReLU (NaN in, NaN out).
    """

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.clamp_min(0)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (output,) = ctx.saved_tensors
        return grad * output.sign()


def relu_(x: torch.Tensor) -> torch.Tensor:
    """ReLU of a linear layer's fresh output: in place in eager mode (the layer's
    backward does not need its output; one tensor fewer to allocate and fill), without
    a bool mask under ``torch.compile`` (see ``_MaskFreeReLU``)."""
    if torch.compiler.is_compiling():
        return _MaskFreeReLU.apply(x)
    return x.relu_()


class ReLU(nn.Module):
    """``relu_`` as a layer of an ``nn.Sequential``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return relu_(x)


class Linear(nn.Linear):
    """``nn.Linear`` whose bias, under ``torch.compile``, is added after the matmul.

    ``addmm`` first copies the broadcast bias into its output and multiplies onto it;
    inductor keeps it as one library call, copy included.  A plain matmul plus bias
    lets the add fuse into the next pointwise kernel (the ReLU) instead.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return x @ self.weight.t() + self.bias
        return super().forward(x)


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int) -> nn.Sequential:
    """ReLU MLP ``in_dim -> hidden... -> out_dim`` with a linear output."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [Linear(in_dim, width), ReLU()]
        in_dim = width
    layers.append(Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


class EnsembleLinear(nn.Module):
    """E independent linear layers applied as one ``baddbmm``: x [E,B,in] -> [E,B,out]."""

    def __init__(self, members: int, in_dim: int, out_dim: int):
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)  # nn.Linear's default initialisation
        self.weight = nn.Parameter(torch.empty(members, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(members, 1, out_dim).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        w, b = (self.weight.detach(), self.bias.detach()) if frozen else (self.weight, self.bias)
        if torch.compiler.is_compiling():
            return torch.bmm(x, w) + b  # the add fuses into the next kernel (see Linear)
        return torch.baddbmm(b, x, w)


class EnsembleMLP(nn.Module):
    """E ReLU MLPs evaluated together.

    ``forward(x [E,B,in] or [B,in], frozen)`` -> [E,B,out]; with ``frozen=True`` no
    gradient reaches the parameters (it still flows to ``x``).
    """

    def __init__(self, members: int, in_dim: int, hidden: Sequence[int], out_dim: int):
        super().__init__()
        self.members = members
        dims = [in_dim, *hidden, out_dim]
        self.layers = nn.ModuleList(
            EnsembleLinear(members, d_in, d_out) for d_in, d_out in zip(dims[:-1], dims[1:])
        )

    def forward(self, x: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(self.members, *x.shape)
        # Unpacked, not ``self.layers[:-1]``: slicing a ModuleList builds a new Module.
        *hidden, last = self.layers
        for layer in hidden:
            x = relu_(layer(x, frozen))
        return last(x, frozen)
