"""The agent's optimiser: one fused Adam over every trained part, and a lean step."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mbvi._private_torch import FUSED_ADAM, OPTIMIZER_GLOBAL_HOOKS, add_


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


def clear_grads(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.zero_grad(set_to_none=True)`` without its profiler record and checks:
    a tenth of its time at SAC's 13 parameter tensors."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


# Private torch names that Adam.step itself uses (mbvi._private_torch); without them,
# Adam.step is used.
_FUSED_KERNEL = FUSED_ADAM
_GLOBAL_HOOKS = OPTIMIZER_GLOBAL_HOOKS


def adam_step(optimizer: torch.optim.Adam) -> None:
    """``optimizer.step()`` for a fused Adam, calling its fused kernel directly.

    The same update (the kernel Adam itself calls, on the same state tensors), without
    the Python bookkeeping that ``Adam.step`` spends per call, a visible share of an
    update at SAC's sizes (profiler record, hook and grad-mode wrappers, state checks,
    grouping by device).
    Falls back to ``optimizer.step()`` whenever that bookkeeping matters: an optimiser
    that is not a plain fused Adam, step hooks, a parameter's first step (its state is
    created there), or parameters on several devices or dtypes.  Like Adam, parameters
    without a gradient are left alone.
    """
    if not _lean_step_applies(optimizer):
        optimizer.step()
        return
    work = []
    first = None
    for group in optimizer.param_groups:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = optimizer.state.get(p)
            first = first or (p.device, p.dtype)
            if not state or p.grad.is_sparse or (p.device, p.dtype) != first:
                optimizer.step()
                return
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if params:
            work.append((group, params, grads, exp_avgs, exp_avg_sqs, steps))
    with torch.no_grad():
        for group, params, grads, exp_avgs, exp_avg_sqs, steps in work:
            beta1, beta2 = group["betas"]
            add_(steps, 1)
            _FUSED_KERNEL(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                [],
                steps,
                amsgrad=False,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=False,
                grad_scale=None,
                found_inf=None,
            )


def _lean_step_applies(optimizer: torch.optim.Optimizer) -> bool:
    if type(optimizer) is not torch.optim.Adam or _FUSED_KERNEL is None:
        return False
    hooks = [
        *_GLOBAL_HOOKS,
        getattr(optimizer, "_optimizer_step_pre_hooks", None),
        getattr(optimizer, "_optimizer_step_post_hooks", None),
    ]
    if any(h is None or len(h) for h in hooks):  # hooks, or a torch that keeps them elsewhere
        return False
    for group in optimizer.param_groups:
        if not group.get("fused") or group.get("amsgrad") or group.get("maximize"):
            return False
        if group.get("capturable") or group.get("differentiable"):
            return False
        if group.get("decoupled_weight_decay") or isinstance(group["lr"], torch.Tensor):
            return False
        if any(isinstance(beta, torch.Tensor) for beta in group["betas"]):
            return False
    return True
