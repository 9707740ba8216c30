"""Q-function ensembles: Q_ψ(s, a) for E critics at once."""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from mbvi._private_torch import linear_relu, linear_relu_fused, relu_backward_
from mbvi.models.mlp import EnsembleMLP
from mbvi.models.threads import run_split, split_count

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
        model-based value differentiating through predicted states), for critics
        without hidden layers, and on CPU below ``MIN_FAST_ROWS`` rows, where autograd
        is the faster of the two.
        """
        small = a.device.type == "cpu" and a.shape[0] * a.shape[1] < MIN_FAST_ROWS
        if small or len(self.net.layers) < 2 or (s.requires_grad and torch.is_grad_enabled()):
            qs = self(s, a, frozen=True)
            return qs.min(0).values if reduce == "min" else qs.mean(0)
        params = [p.detach() for layer in self.net.layers for p in (layer.weight, layer.bias)]
        need_grad = a.requires_grad and torch.is_grad_enabled()
        return FrozenReducedQ.apply(a, s.detach(), reduce, need_grad, *params)


class _Scratch(threading.local):
    """Reusable CPU buffers for activations that never outlive one call.

    Writing each layer into the same warm memory, rather than a fresh multi-megabyte
    tensor per call, keeps the paper-setting gradient estimate closer to its matmul
    time.  Buffers are per thread and keep the size of their largest request (4 MiB
    per layer for the chunked gradient estimate; a whole unchunked batch of 128 × 200
    actions would keep 52 MiB).  Small requests, requests on other devices (whose
    caching allocator already reuses memory) and requests under ``torch.inference_mode``
    (whose tensors could not be written outside it later) are plain allocations.
    """

    MIN_NUMEL = 1 << 16  # 256 KiB of float32: below this a fresh tensor is cheaper

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        numel = math.prod(shape)
        if numel < self.MIN_NUMEL or like.device.type != "cpu" or torch.is_inference_mode_enabled():
            return like.new_empty(shape)
        buf = self.buffers.get(name)
        if buf is None or buf.dtype != like.dtype or len(buf) < numel:
            buf = self.buffers[name] = like.new_empty(numel)
        return buf[:numel].view(shape)


_scratch = _Scratch()

# Rows (states × actions) per chunk on CPU.  Q̂ is independent across states, so the
# states run in slices: a chunk's activations (2 critics × 2048 rows × 256 floats =
# 4 MiB per layer) stay in cache, whereas one pass over the paper's 128 × 200 actions
# streams 52 MiB per layer (the gain is in docs/performance.md).
CHUNK_ROWS = 2048

# Fewer rows (states × actions) than this take autograd through ``forward`` on CPU: at
# SAC's one action per state (256 rows) it runs faster than the hand-written pass,
# whose per-member fused layers and gathers only pay off from about 1,000 rows up.
MIN_FAST_ROWS = 1024

# Whether CPU chunks are split across threads (``models.threads``); off, they run one
# after another, each op using all intra-op threads.
PARALLEL_CHUNKS = True

# Actions per state from which the first layer runs one matmul per (member, state).
_PER_STATE_FIRST_LAYER = 32


def _ensemble_forward(
    s: torch.Tensor, a: torch.Tensor, params: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(Q [E,B·N], post-ReLU hidden activations per layer) of the ensemble MLP.

    Each layer's activations are indexed by member (``h[e]`` [B·N,H]): one [E,B·N,H]
    tensor, or a list of E tensors from the fused oneDNN linear+ReLU (CPU float32).
    Tensors may be scratch buffers, valid until the next call.  The first layer is
    split into its state and action rows, so the state's share is computed once per
    state rather than once per action (N times), and [s, a] is never concatenated.
    """
    b, n, act_dim = a.shape
    w, bias = params[0], params[1]
    members, obs_dim, width = w.shape[0], s.shape[-1], w.shape[-1]
    h_s = torch.baddbmm(bias, s.unsqueeze(0).expand(members, b, obs_dim), w[:, :obs_dim])
    h = _scratch.take("h0", (members, b * n, width), a)
    if n >= _PER_STATE_FIRST_LAYER:
        # One small matmul per (member, state) whose input is the state's share: the
        # broadcast add is fused into the matmul instead of a pass over [E,B·N,H].
        a_rep = a.unsqueeze(0).expand(members, b, n, act_dim).reshape(members * b, n, act_dim)
        w_a = w[:, obs_dim:].unsqueeze(1).expand(members, b, act_dim, width)
        w_a = w_a.reshape(members * b, act_dim, width)
        torch.baddbmm(h_s.view(members * b, 1, width), a_rep, w_a, out=h.view(members * b, n, -1))
    else:
        torch.bmm(a.reshape(1, b * n, act_dim).expand(members, -1, -1), w[:, obs_dim:], out=h)
        h.view(members, b, n, -1).add_(h_s.unsqueeze(2))
    hidden = [h.relu_()]
    fused = linear_relu_fused(a)
    for layer, (w, bias) in enumerate(zip(params[2:-2:2], params[3:-2:2]), start=1):
        if fused:
            # One oneDNN matmul with bias and ReLU as post-ops, per member: no separate
            # passes over the activations for the bias and the ReLU.
            x = hidden[-1]
            hidden.append([linear_relu(x[e], w[e].t(), bias[e, 0]) for e in range(members)])
        else:
            # bmm then add_: faster on CPU than baddbmm, which first copies the bias.
            h = _scratch.take(f"h{layer}", (members, b * n, w.shape[-1]), a)
            hidden.append(torch.bmm(hidden[-1], w, out=h).add_(bias).relu_())
    # The output layer is a matrix-vector product per member: addmm runs it faster on
    # CPU than a batched matmul with one output column.
    x, w, bias = hidden[-1], params[-2], params[-1]
    q = a.new_empty(members, b * n, 1)
    for e in range(members):
        torch.addmm(bias[e], x[e], w[e], out=q[e])
    return q.squeeze(-1), hidden


def _action_gradient(
    hidden: list[torch.Tensor],
    weights: Sequence[torch.Tensor],
    obs_dim: int,
    which: torch.Tensor | None,
    gather: bool,
) -> torch.Tensor:
    """∂Q̂/∂a per row [B·N, A], Q̂ = min (``which``: the minimising member of each row)
    or mean (``which`` None) over members, from the forward's activations (consumed).

    For ``min`` each row goes back through the one member that attains it (the others'
    gradient is exactly zero): with ``gather`` (CPU) its rows are gathered, halving the
    backward matmuls of twin Q; without (CUDA) they are masked, to avoid a host sync.
    """
    members, rows = weights[0].shape[0], hidden[0].shape[1]
    grad = hidden[0].new_zeros(rows, weights[0].shape[1] - obs_dim)
    gather = gather and which is not None
    for e in range(members):
        w_out = weights[-1][e, :, 0]  # [H_L]
        if gather:
            idx = (which == e).nonzero().squeeze(1)
            r = idx.shape[0]
            acts = [
                torch.index_select(
                    h[e], 0, idx, out=_scratch.take(f"g{i}", (r, h[e].shape[1]), h[e])
                )
                for i, h in enumerate(hidden)
            ]
            d = w_out.expand(r, -1)
        else:
            r, acts = rows, [h[e] for h in hidden]
            d = (
                (w_out / members).expand(rows, -1)
                if which is None
                else (which == e)[:, None] * w_out
            )
        for layer in range(len(acts) - 1, 0, -1):
            d = relu_backward_(d, acts[layer])
            w = weights[layer][e]
            d = torch.mm(d, w.t(), out=_scratch.take(f"d{layer}", (r, w.shape[0]), d))
        # Through the first layer's action rows [A,H]: as (W_a · dᵀ)ᵀ, which runs faster
        # on CPU than d · W_aᵀ with its A (a few) output columns.
        d = (weights[0][e, obs_dim:] @ relu_backward_(d, acts[0]).t()).t()
        if gather:
            grad.index_copy_(0, idx, d)
        else:
            grad += d
    return grad


def _even_slices(start: int, stop: int, parts: int) -> list[slice]:
    """[start, stop) cut into ``parts`` consecutive slices whose sizes differ by at most
    1 (none for ``parts`` 0)."""
    if parts == 0:
        return []
    bounds = [start + (stop - start) * i // parts for i in range(parts + 1)]
    return [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]


class FrozenReducedQ(torch.autograd.Function):
    """Q̂(s, a) = reduce_e Q_ψe(s, a) with ψ constant, differentiable in ``a`` only.

    ``apply(a [B,N,A], s [B,S], reduce, need_grad, w_1, b_1, ..., w_L, b_L)`` -> [B,N],
    with the ``EnsembleLinear`` weights ``w_l`` [E,in,out] and biases ``b_l`` [E,1,out].

    Why hand-written: inference differentiates Q̂ w.r.t. many actions per state
    (Iterative's N = 200) and never w.r.t. ψ.  Each Q̂(s, a_i) depends on its own action
    only, so the forward pass (when ``need_grad``) also computes the per-row gradient
    ∂Q̂_i/∂a_i [B,N,A] while the activations are still in cache, and the backward pass
    scales it by the incoming gradient.  No weight gradients, no autograd graph per
    layer; on CPU the hidden layers after the first run as one fused oneDNN
    linear+bias+ReLU per member (float32), and the other activations live in reused
    scratch buffers (see ``_Scratch``).  On CPU the states run at most
    ``CHUNK_ROWS // N`` at a time (same result), so that the activations stay in cache,
    and with T > 1 intra-op threads, T worker threads with one intra-op thread each
    take a block of states apiece (``PARALLEL_CHUNKS``, ``mbvi.models.threads``).
    """

    @staticmethod
    def forward(ctx, a, s, reduce, need_grad, *params):
        b, n, _ = a.shape
        on_cpu = a.device.type == "cpu"  # a GPU wants the whole batch at once
        step = max(1, CHUNK_ROWS // n) if on_cpu else b
        q = a.new_empty(b, n)
        grad = torch.empty_like(a) if need_grad else None

        def run(block: slice) -> None:  # ``block``'s states, at most ``step`` at a time
            chunks = -(-(block.stop - block.start) // step)
            for rows in _even_slices(block.start, block.stop, chunks):
                q_e, hidden = _ensemble_forward(s[rows], a[rows], params)
                q_e, which = q_e.min(0) if reduce == "min" else (q_e.mean(0), None)
                q[rows] = q_e.view(-1, n)
                if need_grad:
                    g = _action_gradient(hidden, params[0::2], s.shape[-1], which, on_cpu)
                    grad[rows] = g.view(-1, n, a.shape[-1])

        # On CPU with several chunks, each thread takes an equal block of states.
        k = split_count(-(-b // step)) if on_cpu and PARALLEL_CHUNKS else 1
        run_split(run, _even_slices(0, b, k))
        if need_grad:
            ctx.save_for_backward(grad)
        return q

    @staticmethod
    def backward(ctx, grad_q):
        if not ctx.saved_tensors:
            raise RuntimeError("FrozenReducedQ: backward needs a forward run with need_grad=True")
        (grad,) = ctx.saved_tensors
        return grad_q.unsqueeze(-1) * grad, *[None] * (len(ctx.needs_input_grad) - 1)
