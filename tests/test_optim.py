"""The agent's lean Adam step and gradient clearing against torch's own."""

import copy

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from mbvi.training.optim import adam_step, clear_grads, fused_adam


def _model_and_optimiser(dtype=torch.float32):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    net = net.to(dtype)
    extra = torch.nn.Parameter(torch.randn(4, dtype=dtype))
    opt = fused_adam([(list(net.parameters()), 1e-2), ([extra], 3e-3)])
    return net, extra, opt


def _loss(net, extra, x, with_extra=True):
    loss = net(x).pow(2).mean()
    return loss + extra.sin().sum() if with_extra else loss


def _steps(step, skip_extra_at=(), hook=None, dtype=torch.float32):
    net, extra, opt = _model_and_optimiser(dtype)
    if hook is not None:
        opt.register_step_post_hook(hook)
    g = torch.Generator().manual_seed(1)
    for i in range(6):
        clear_grads(opt)
        x = torch.randn(8, 5, generator=g, dtype=dtype)
        _loss(net, extra, x, with_extra=i not in skip_extra_at).backward()
        step(opt)
    return net, extra, opt


@pytest.mark.parametrize("skip", [(), (2, 3)], ids=["all-grads", "a-param-without-grad"])
def test_adam_step_is_torch_adam(skip):
    """Same parameters and state, bit for bit, as Adam.step, including steps where a
    parameter has no gradient (Adam leaves it and its step count alone)."""
    ref = _steps(lambda opt: opt.step(), skip)
    lean = _steps(adam_step, skip)
    for a, b in zip([*ref[0].parameters(), ref[1]], [*lean[0].parameters(), lean[1]]):
        assert torch.equal(a, b)
    ref_state, lean_state = ref[2].state_dict()["state"], lean[2].state_dict()["state"]
    assert ref_state.keys() == lean_state.keys()
    for i in ref_state:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(ref_state[i][name], lean_state[i][name]), (i, name)
    assert float(lean_state[len(ref_state) - 1]["step"]) == 6 - len(skip)


def test_adam_step_skips_adam_step_once_the_state_exists():
    """Only the first step (which creates Adam's state) goes through Adam.step."""
    calls = []

    def counted(opt):
        step = opt.step
        opt.step = lambda *args, **kwargs: calls.append(1) or step(*args, **kwargs)
        adam_step(opt)
        del opt.step

    _steps(counted)
    assert len(calls) == 1


def test_adam_step_runs_global_step_hooks():
    calls = []
    handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: calls.append(1))
    try:
        _steps(adam_step)
    finally:
        handle.remove()
    assert len(calls) == 6


def test_adam_step_is_torch_adam_after_loading_a_state():
    """A loaded state (a resumed run) replaces the state tensors: the lean step uses
    the new ones."""
    net, extra, opt = _steps(lambda o: o.step())
    saved = copy.deepcopy(opt.state_dict())
    nets = []
    for step in (lambda o: o.step(), adam_step):
        n, e = copy.deepcopy(net), copy.deepcopy(extra)
        o = fused_adam([(list(n.parameters()), 1e-2), ([e], 3e-3)])
        o.load_state_dict(copy.deepcopy(saved))  # loading keeps the tensors it is given
        clear_grads(o)
        _loss(n, e, torch.ones(2, 5)).backward()
        step(o)
        nets.append([*n.parameters(), e])
    for a, b in zip(*nets):
        assert torch.equal(a, b)


def test_adam_step_runs_step_hooks():
    calls = []
    _steps(adam_step, hook=lambda opt, args, kwargs: calls.append(1))
    assert len(calls) == 6  # through optimizer.step(), which calls them


def test_adam_step_falls_back_for_other_optimisers():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.5)
    p.grad = torch.ones(3)
    adam_step(opt)
    assert torch.equal(p.detach(), torch.full((3,), 0.5))


def test_clear_grads_sets_every_gradient_to_none():
    net, extra, opt = _model_and_optimiser()
    _loss(net, extra, torch.ones(2, 5)).backward()
    assert all(p.grad is not None for p in [*net.parameters(), extra])
    clear_grads(opt)
    assert all(p.grad is None for p in [*net.parameters(), extra])
