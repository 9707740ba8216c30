"""Imagined trajectories: a world model rolled H steps from (s, a_0), future actions
from a policy (the prior, or an engine's posterior).  Pure torch, no Lightning.

``rollout`` returns what ``mbvi.variational.objectives.trajectory_return`` scores:
per-step rewards, KL terms and survival, and the states and actions of every step (the
leaf value is read at s_H, a_H).  The model-based value, the planners and the Pyro
check all roll out through this one function.

Shapes: H horizon, B states, N particles per state, S state dims, A action dims.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from mbvi.variational.distributions import Posterior, TanhGaussian
from mbvi.variational.objectives import policy_kl
from mbvi.variational.priors import Prior
from mbvi.variational.world_model import Propagation

PolicyFn = Callable[[torch.Tensor], Posterior]
"""π(·|s) for states [M,S] -> a posterior over [M, A] (e.g. an engine's ``infer``)."""
ActFn = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
"""act(s_t [M,S], t) -> (a_t [M,A], KL_t [M]): how a rollout picks step t's action."""
StepFn = Callable[..., object]
"""``model.step(s [M,S], a [M,A], propagation) -> Step`` (``WorldModel.step``)."""


@dataclass
class Rollout:
    """H-step trajectories of B states × N particles.

    Attributes:
        states: s_0..s_H, ``[H+1,B,N,S]``.
        actions: a_0..a_H, ``[H+1,B,N,A]`` (a_H is the leaf's action).
        rewards: r_0..r_{H-1}, ``[H,B,N]``.
        kl: KL_t of the step-t policy to the prior in the objective's KL form,
            ``[H+1,B,N]``; KL_0 = 0 (a_0 is given), and at a step whose action comes
            from the prior itself KL(p‖p) = 0 plus the constant the form drops
            (``Prior.dropped_log_density``: −A log 2 for the uniform prior's entropy form).
        alive: probability that no termination came before step t, ``[H+1,B,N]``.
    """

    states: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    kl: torch.Tensor
    alive: torch.Tensor


def rollout(
    step: StepFn,
    s: torch.Tensor,
    a0: torch.Tensor,
    horizon: int,
    prior: Prior,
    policy: PolicyFn | None = None,
    propagation: Propagation = "ts1",
    actions: torch.Tensor | None = None,
    act: ActFn | None = None,
) -> Rollout:
    """Roll ``step`` (a world model's ``step``) H steps from states ``s`` [B,S] under
    first actions ``a0`` [B,N,A] (one trajectory per particle).

    Args:
        step: one transition, ``step(s [M,S], a [M,A], propagation) -> Step``.
        horizon: H >= 0 model steps.
        prior: p_θ; future actions come from it when ``policy`` is None (then KL_t is
            0 in the KL form).
        policy: π(·|s_t) for t >= 1, reparameterised so gradients flow from a_0
            through the states into later actions; KL_t is closed-form where both are
            tanh-Gaussians, else log π(a_t)/p(a_t) of the sample.
        propagation: how particles move through an ensemble (``Propagation``).
        actions: optional fixed actions a_1..a_k, ``[k,B,N,A]`` with k <= H (a
            planner's sequence); steps after k draw from ``policy`` or the prior.
        act: replaces ``policy`` and the prior for t >= 1 with one's own sampler and
            KL estimate (the Pyro twin's sample KL that matches the ELBO draw for draw).
    """
    b, n, a_dim = a0.shape
    s_t = s.unsqueeze(1).expand(b, n, s.shape[-1]) if s.dim() == 2 else s
    zeros = a0.new_zeros(b, n)
    states, acts, rewards, kls, alive = [s_t], [a0], [], [zeros], [torch.ones_like(zeros)]
    a_t = a0
    for t in range(horizon):
        out = step(s_t.reshape(b * n, -1), a_t.reshape(b * n, a_dim), propagation)
        s_t = out.next_state.reshape(b, n, -1)
        rewards.append(out.reward.reshape(b, n))
        alive.append(alive[-1] * (1.0 - out.terminated.reshape(b, n).to(zeros.dtype)))
        if actions is not None and t < actions.shape[0]:
            a_t, kl_t = actions[t], zeros
        elif act is not None:
            a_rows, kl_rows = act(s_t.reshape(b * n, -1), t + 1)
            a_t, kl_t = a_rows.reshape(b, n, a_dim), kl_rows.reshape(b, n)
        else:
            a_t, kl_t = _next_action(s_t, prior, policy)
        states.append(s_t)
        acts.append(a_t)
        kls.append(kl_t)
    reward = torch.stack(rewards) if rewards else a0.new_zeros(0, b, n)
    return Rollout(
        torch.stack(states), torch.stack(acts), reward, torch.stack(kls), torch.stack(alive)
    )


def _next_action(
    s: torch.Tensor, prior: Prior, policy: PolicyFn | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One action per particle state ``s`` [B,N,S] and its KL term ``[B,N]``."""
    b, n, _ = s.shape
    rows = s.reshape(b * n, -1)
    if policy is None:
        # KL(p‖p) = 0, read in the objective's form: the uniform prior's entropy form
        # credits its entropy A log 2 (the term is E_p[log p]).
        return prior.sample(rows, 1).reshape(b, n, -1), s.new_full(
            (b, n), prior.dropped_log_density()
        )
    posterior = policy(rows)
    if isinstance(posterior, TanhGaussian):
        a, u = posterior.rsample(1)  # [M,1,A]
    else:
        a, u = posterior.sample(1), None
    kl = policy_kl(posterior, prior, rows, a, u=u)
    return a.reshape(b, n, -1), kl.reshape(b, n)


def per_particle(fn: Callable, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Call ``fn(s [B,S], a [B,N,A]) -> [B,N]`` (the ValueFn contract) when every
    particle has its own state ``s`` [...,S] and action ``a`` [...,A]: one state per
    row, one action each -> [...].  States [B,S] shared by the particles pass through."""
    if s.dim() == 2:
        return fn(s, a)
    rows = s.reshape(-1, s.shape[-1])
    return fn(rows, a.reshape(rows.shape[0], 1, -1)).reshape(s.shape[:-1])


def frozen_module(module: nn.Module) -> Callable[..., object]:
    """``module``'s forward with its parameters detached: gradients reach the inputs
    but never the parameters.  How inference runs a world model or a policy inside a
    value estimate without training them."""

    def call(*args, **kwargs):
        params = {name: p.detach() for name, p in module.named_parameters()}
        return torch.func.functional_call(module, params, args, kwargs, strict=False)

    return call
