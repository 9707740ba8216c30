"""Multi-layer perceptrons, plain and ensembled (E members as one batched matmul)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int) -> nn.Sequential:
    """ReLU MLP ``in_dim -> hidden... -> out_dim`` with a linear output.

    The ReLUs run in place on the fresh output of their linear layer (whose backward
    does not need it): one tensor fewer per layer to allocate and fill.
    """
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.ReLU(inplace=True)]
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
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
            x = layer(x, frozen).relu_()  # in place: baddbmm's backward does not need it
        return last(x, frozen)
