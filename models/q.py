"""Q-function ensembles: Q_ψ(s, a) for E critics at once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from mbvi.models.mlp import EnsembleMLP

Reduce = Literal["min", "mean"]


class QEnsemble(nn.Module):
    """E critics Q_ψe(s, a) as one batched MLP.

    ``forward(s [B,S], a [B,N,A], frozen)`` -> [E,B,N] (training and general use);
    ``frozen_reduced(s, a, reduce)`` -> [B,N], the members' min or mean with the
    parameters held constant: the fast path of inference (see ``FrozenReducedQ``).
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int], members: int = 2):
        super().__init__()
        self.obs_dim = obs_dim
        self.net = EnsembleMLP(members, obs_dim + act_dim, hidden, 1)

    def forward(self, s: torch.Tensor, a: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        b, n, _ = a.shape
        sa = torch.cat([s.unsqueeze(1).expand(b, n, s.shape[-1]), a], dim=-1)
        return self.net(sa.reshape(b * n, -1), frozen).view(-1, b, n)

    def frozen_reduced(self, s: torch.Tensor, a: torch.Tensor, reduce: Reduce) -> torch.Tensor:
        """min or mean over members of Q_ψe(s, a) [B,N]; gradients reach ``a`` only.

        Falls back to autograd through ``forward`` when ``s`` needs a gradient (e.g. a
        model-based value differentiating through predicted states) and for critics
        without hidden layers.
        """
        if len(self.net.layers) < 2 or (s.requires_grad and torch.is_grad_enabled()):
            qs = self(s, a, frozen=True)
            return qs.min(0).values if reduce == "min" else qs.mean(0)
        params = [p.detach() for layer in self.net.layers for p in (layer.weight, layer.bias)]
        return FrozenReducedQ.apply(a, s.detach(), reduce, *params)


def _ensemble_forward(
    s: torch.Tensor, a: torch.Tensor, params: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(Q [E,B·N], post-ReLU hidden activations [E,B·N,H]) of the ensemble MLP.

    The first layer is split into its state and action rows, so the state's share is
    computed once per state rather than once per action (N times), and [s, a] is never
    concatenated.  ReLUs run in place on fresh outputs.
    """
    b, n, act_dim = a.shape
    w, bias = params[0], params[1]
    members, obs_dim = w.shape[0], s.shape[-1]
    h_s = torch.baddbmm(bias, s.unsqueeze(0).expand(members, b, obs_dim), w[:, :obs_dim])
    if n >= _PER_STATE_FIRST_LAYER:
        # One small matmul per (member, state) whose input is the state's share: the
        # broadcast add is fused into the matmul instead of a pass over [E,B·N,H].
        a_rep = a.unsqueeze(0).expand(members, b, n, act_dim).reshape(members * b, n, act_dim)
        w_a = w[:, obs_dim:].unsqueeze(1).expand(members, b, act_dim, w.shape[-1])
        w_a = w_a.reshape(members * b, act_dim, -1)
        h = torch.baddbmm(h_s.view(members * b, 1, -1), a_rep, w_a)
        h = h.relu_().view(members, b * n, -1)
    else:
        h = torch.bmm(a.reshape(1, b * n, act_dim).expand(members, -1, -1), w[:, obs_dim:])
        h.view(members, b, n, -1).add_(h_s.unsqueeze(2)).relu_()
    hidden = [h]
    for w, bias in zip(params[2:-2:2], params[3:-2:2]):
        hidden.append(torch.baddbmm(bias, hidden[-1], w).relu_())
    # The output layer is a matrix-vector product per member: addmm runs it 3-4x faster
    # on CPU than a batched matmul with one output column.
    x, w, bias = hidden[-1], params[-2], params[-1]
    q = x.new_empty(members, x.shape[1], 1)
    for e in range(members):
        torch.addmm(bias[e], x[e], w[e], out=q[e])
    return q.squeeze(-1), hidden


# Actions per state from which the first layer runs one matmul per (member, state).
_PER_STATE_FIRST_LAYER = 32


def _relu_backward(grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``grad`` where the ReLU output ``out`` is positive, else 0: ReLU's own backward
    kernel (one fused op; a mask plus ``masked_fill`` is ~10x slower on CPU)."""
    return torch.ops.aten.threshold_backward(grad, out, 0.0)


class FrozenReducedQ(torch.autograd.Function):
    """Q̂(s, a) = reduce_e Q_ψe(s, a) with ψ constant, differentiable in ``a`` only.

    ``apply(a [B,N,A], s [B,S], reduce, w_1, b_1, ..., w_L, b_L)`` -> [B,N], with the
    ``EnsembleLinear`` weights ``w_l`` [E,in,out] and biases ``b_l`` [E,1,out].

    Why hand-written: inference differentiates Q̂ w.r.t. many actions per state
    (Iterative's N = 200) and never w.r.t. ψ.  The backward pass here (i) computes no
    weight gradients, (ii) for ``min`` propagates each action only through the member
    that attains the minimum (the others' gradient is exactly zero), halving the
    backward matmuls of twin Q on CPU, (iii) keeps no autograd graph per layer.
    On CUDA the rows are masked instead of gathered, to avoid a host sync.
    """

    @staticmethod
    def forward(ctx, a, s, reduce, *params):
        q, hidden = _ensemble_forward(s, a, params)
        if reduce == "min":
            q, which = q.min(0)
        else:
            q, which = q.mean(0), None
        ctx.reduce, ctx.which, ctx.hidden = reduce, which, hidden
        ctx.weights = params[0::2]
        ctx.act_shape = a.shape
        return q.view(a.shape[:-1])

    @staticmethod
    def backward(ctx, grad_q):
        weights, hidden, (b, n, act_dim) = ctx.weights, ctx.hidden, ctx.act_shape
        members, obs_dim = weights[0].shape[0], weights[0].shape[1] - act_dim
        g = grad_q.reshape(b * n)
        grad_a = g.new_zeros(b * n, act_dim)
        for e in range(members):
            if ctx.reduce == "mean":
                rows, d = None, g / members
            elif g.is_cuda:
                rows, d = None, g * (ctx.which == e)
            else:
                rows = (ctx.which == e).nonzero().squeeze(1)
                d = g.index_select(0, rows)
            d = d.unsqueeze(1) * weights[-1][e].squeeze(-1)  # [R_e, H_L]
            for layer in range(len(hidden) - 1, -1, -1):
                h = hidden[layer][e] if rows is None else hidden[layer][e].index_select(0, rows)
                d = _relu_backward(d, h)
                w = weights[layer][e] if layer else weights[0][e, obs_dim:]
                d = d @ w.t()
            if rows is None:
                grad_a += d
            else:
                grad_a.index_copy_(0, rows, d)
        return grad_a.view(b, n, act_dim), None, None, *[None] * (2 * len(weights))
