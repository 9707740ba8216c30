"""The value estimate's fast frozen path against plain autograd through the critics."""

import pytest
import torch

import mbvi.models.q as q_module
from mbvi import _private_torch as pt
from mbvi.models.q import (
    FrozenReducedQ,
    QEnsemble,
    _action_gradient,
    _ensemble_forward,
    _Scratch,
)
from mbvi.variational.values import TwinQ


@pytest.fixture(autouse=True)
def hand_written_path_at_any_size(monkeypatch):
    """The tests' shapes are below the rows from which the CPU takes the hand-written
    pass (``MIN_FAST_ROWS``): lower the threshold so that they test that pass."""
    monkeypatch.setattr(q_module, "MIN_FAST_ROWS", 0)


@pytest.fixture(params=[False, True], ids=["fresh", "scratch"])
def scratch(request, monkeypatch):
    """Run a test with plain allocations and again with every activation in the reused
    scratch buffers (the test shapes are below their size threshold)."""
    if request.param:
        monkeypatch.setattr(_Scratch, "MIN_NUMEL", 0)
    return request.param


def _reference(q: QEnsemble, s, a, reduce):
    qs = q(s, a, frozen=True)
    return qs.min(0).values if reduce == "min" else qs.mean(0)


@pytest.mark.parametrize("reduce", ["min", "mean"])
@pytest.mark.parametrize("members,hidden", [(2, (8, 8)), (3, (5,)), (2, (6, 7, 5))])
@pytest.mark.parametrize("n", [1, 7, 40])  # both first-layer paths (per state from 32)
def test_frozen_reduced_matches_autograd(reduce, members, hidden, n, scratch):
    torch.manual_seed(0)
    q = QEnsemble(4, 3, hidden, members).double()
    s = torch.randn(5, 4, dtype=torch.float64)
    a = torch.rand(5, n, 3, dtype=torch.float64) * 2 - 1
    a_ref, a_fast = a.clone().requires_grad_(True), a.clone().requires_grad_(True)
    ref, fast = _reference(q, s, a_ref, reduce), q.frozen_reduced(s, a_fast, reduce)
    torch.testing.assert_close(fast, ref)
    w = torch.randn_like(ref)  # an arbitrary upstream gradient
    (g_ref,) = torch.autograd.grad((ref * w).sum(), a_ref)
    (g_fast,) = torch.autograd.grad((fast * w).sum(), a_fast)
    torch.testing.assert_close(g_fast, g_ref)
    assert all(p.grad is None for p in q.parameters())  # the critic is never trained


@pytest.mark.parametrize("reduce", ["min", "mean"])
def test_frozen_reduced_gradcheck(reduce):
    """The hand-written backward against finite differences of the forward."""
    torch.manual_seed(1)
    q = QEnsemble(3, 2, (6, 6), 2).double()
    s = torch.randn(2, 3, dtype=torch.float64)
    a = (torch.rand(2, 33, 2, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    params = [p.detach() for layer in q.net.layers for p in (layer.weight, layer.bias)]
    assert torch.autograd.gradcheck(
        lambda a_: FrozenReducedQ.apply(a_, s, reduce, True, *params), (a,), eps=1e-6, atol=1e-6
    )


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this build")
def test_fused_hidden_layers_are_used_on_cpu_float32_only():
    """The oneDNN linear+ReLU serves float32 on CPU (its probe agrees with plain torch);
    float64 (the exact tests above) takes bmm, bias add and ReLU."""
    assert pt.linear_relu_fused(torch.zeros(1))
    assert not pt.linear_relu_fused(torch.zeros(1, dtype=torch.float64))


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("reduce", ["min", "mean"])
@pytest.mark.parametrize("members,hidden", [(2, (32, 32)), (3, (24,)), (2, (16, 24, 16))])
@pytest.mark.parametrize("n", [1, 40])
def test_frozen_reduced_float32_matches_autograd(fused, reduce, members, hidden, n, monkeypatch):
    """float32, as trained: both hidden-layer paths (fused oneDNN linear+ReLU and plain
    ops) against autograd through the critics, in value and action gradient."""
    if fused and not pt.linear_relu_fused(torch.zeros(1)):
        pytest.skip("no fused linear+ReLU in this build")
    monkeypatch.setattr(pt, "_LINEAR_RELU_OK", fused)
    # The plain variant also takes relu_backward_'s fallback: a torch without the
    # private kernels must still give autograd's gradient.
    monkeypatch.setattr(pt, "_RELU_BACKWARD_OK", fused and pt._RELU_BACKWARD_OK)
    torch.manual_seed(7)
    q = QEnsemble(5, 3, hidden, members)
    s, a = torch.randn(6, 5), torch.rand(6, n, 3) * 2 - 1
    a_ref, a_fast = a.clone().requires_grad_(True), a.clone().requires_grad_(True)
    ref, fast = _reference(q, s, a_ref, reduce), q.frozen_reduced(s, a_fast, reduce)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(ref)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), a_ref)
    (g_fast,) = torch.autograd.grad((fast * w).sum(), a_fast)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-5)


def test_frozen_path_falls_back_when_states_need_gradients():
    """A model-based value may differentiate through predicted states: then Q̂'s
    gradient must reach s too, which the fast path does not compute."""
    torch.manual_seed(2)
    value = TwinQ(hidden=(8, 8))
    value.build(3, 2)
    s = torch.randn(4, 3, requires_grad=True)
    a = torch.rand(4, 5, 2).requires_grad_(True)
    g_s, g_a = torch.autograd.grad(value(s, a, frozen=True).sum(), [s, a])
    assert g_s.abs().sum() > 0 and g_a.abs().sum() > 0
    assert all(p.grad is None for p in value.parameters())


def test_target_critic_is_differentiable_in_actions_only():
    torch.manual_seed(3)
    value = TwinQ(hidden=(8, 8))
    value.build(3, 2)
    with torch.no_grad():
        for p in value.q_target.parameters():
            p.add_(0.1 * torch.randn_like(p))
    s, a = torch.randn(4, 3), torch.rand(4, 5, 2).requires_grad_(True)
    ref = _reference(value.q_target, s, a, "min")
    torch.testing.assert_close(value.target(s, a), ref)
    (g,) = torch.autograd.grad(value.target(s, a).sum(), a)
    (g_ref,) = torch.autograd.grad(ref.sum(), a)
    torch.testing.assert_close(g, g_ref)


def test_frozen_reduced_outputs_survive_later_calls(scratch):
    """Activations live in reused scratch buffers: a second call before the first
    output's backward must not change the first output or its gradient."""
    torch.manual_seed(4)
    q = QEnsemble(4, 3, (16, 16), 2)
    s = torch.randn(6, 4)
    a1 = (torch.rand(6, 40, 3) * 2 - 1).requires_grad_(True)
    a2 = (torch.rand(6, 40, 3) * 2 - 1).requires_grad_(True)
    ref1 = _reference(q, s, a1, "min")
    (g_ref,) = torch.autograd.grad(ref1.sum(), a1)
    fast1 = q.frozen_reduced(s, a1, "min")
    fast2 = q.frozen_reduced(s, a2, "min")  # overwrites the scratch activations
    torch.testing.assert_close(fast1, ref1.detach())
    (g1,) = torch.autograd.grad(fast1.sum(), a1)
    torch.testing.assert_close(g1, g_ref)
    torch.testing.assert_close(fast2, _reference(q, s, a2, "min").detach())


def test_frozen_reduced_skips_the_gradient_when_none_is_needed():
    torch.manual_seed(5)
    q = QEnsemble(4, 3, (8, 8), 2)
    s, a = torch.randn(3, 4), (torch.rand(3, 5, 3) * 2 - 1).requires_grad_(True)
    with torch.no_grad():
        out = q.frozen_reduced(s, a, "min")
    assert not out.requires_grad
    params = [p.detach() for layer in q.net.layers for p in (layer.weight, layer.bias)]
    out = FrozenReducedQ.apply(a, s, "min", False, *params)
    with pytest.raises(RuntimeError, match="need_grad=True"):
        out.sum().backward()


@pytest.mark.parametrize("reduce", ["min", "mean"])
def test_masked_and_gathered_action_gradients_agree(reduce, scratch):
    """CUDA masks the rows of the non-minimising member where CPU gathers them: the
    masked path, run here on CPU, must give the same gradient."""
    torch.manual_seed(6)
    q = QEnsemble(4, 3, (8, 8), 3).double()
    s, a = torch.randn(5, 4, dtype=torch.float64), torch.rand(5, 40, 3, dtype=torch.float64)
    params = [p.detach() for layer in q.net.layers for p in (layer.weight, layer.bias)]
    grads = []
    for gather in (True, False):
        values, hidden = _ensemble_forward(s, a, params)
        which = values.min(0).indices if reduce == "min" else None
        grads.append(_action_gradient([h.clone() for h in hidden], params[0::2], 4, which, gather))
    torch.testing.assert_close(grads[0], grads[1])
    a_ref = a.clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(_reference(q, s, a_ref, reduce).sum(), a_ref)
    torch.testing.assert_close(grads[1].view(5, 40, 3), g_ref)


def test_scratch_buffers_made_under_inference_mode_do_not_break_later_calls(
    monkeypatch, intra_op_threads
):
    monkeypatch.setattr(_Scratch, "MIN_NUMEL", 0)
    monkeypatch.setattr(q_module, "_scratch", _Scratch())  # no buffers yet
    torch.manual_seed(7)
    q = QEnsemble(4, 3, (8, 8), 2)
    s, a = torch.randn(3, 4), torch.rand(3, 40, 3) * 2 - 1
    with torch.inference_mode():
        q.frozen_reduced(s, a, "min")
        monkeypatch.setattr(q_module, "CHUNK_ROWS", 40)  # 3 chunks: worker threads too
        intra_op_threads(3)
        q.frozen_reduced(s, a, "min")
        intra_op_threads(1)
        monkeypatch.setattr(q_module, "CHUNK_ROWS", 2048)
    a = a.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(q.frozen_reduced(s, a, "min").sum(), a)
    a_ref = a.detach().clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(_reference(q, s, a_ref, "min").sum(), a_ref)
    torch.testing.assert_close(g, g_ref)


@pytest.fixture(params=[1, 3], ids=["1-thread", "3-threads"])
def threads(request, intra_op_threads):
    """Intra-op threads for the test (the suite runs with 1): with 3, the CPU chunks
    are split across 3 worker threads (``mbvi.models.threads``)."""
    intra_op_threads(request.param)
    return request.param


@pytest.mark.parametrize("reduce", ["min", "mean"])
@pytest.mark.parametrize("n", [8, 40])  # both first-layer paths
def test_frozen_reduced_in_chunks_equals_one_pass(monkeypatch, reduce, n, scratch, threads):
    """Chunking the states on CPU (to keep activations in cache), and splitting the
    chunks across threads, change nothing but speed: Q̂ and its action gradient match
    one pass over the whole batch."""
    torch.manual_seed(8)
    q = QEnsemble(4, 3, (16, 16), 2).double()
    s = torch.randn(10, 4, dtype=torch.float64)
    a = torch.rand(10, n, 3, dtype=torch.float64) * 2 - 1
    w = torch.randn(10, n, dtype=torch.float64)  # an arbitrary upstream gradient
    results = {}
    for chunk_rows in (10**6, 3 * n):  # one pass; then 3 states per chunk (4 chunks)
        monkeypatch.setattr(q_module, "CHUNK_ROWS", chunk_rows)
        x = a.clone().requires_grad_(True)
        out = q.frozen_reduced(s, x, reduce)
        results[chunk_rows] = (out.detach(), *torch.autograd.grad((out * w).sum(), x))
    for whole, chunked in zip(results[10**6], results[3 * n]):
        torch.testing.assert_close(chunked, whole)


def test_frozen_reduced_on_no_states_is_empty():
    q = QEnsemble(3, 2, (8, 8), 2)
    a = torch.rand(0, 4, 2).requires_grad_(True)
    out = q.frozen_reduced(torch.randn(0, 3), a, "min")
    assert out.shape == (0, 4)
    (g,) = torch.autograd.grad(out.sum(), a)
    assert g.shape == (0, 4, 2)


@pytest.mark.parametrize("b,n,fast", [(16, 1, False), (8, 127, False), (8, 128, True)])
def test_frozen_reduced_takes_autograd_below_min_fast_rows(monkeypatch, b, n, fast):
    """On CPU, fewer than MIN_FAST_ROWS rows (states × actions, e.g. SAC's one action
    per state) run through autograd, from MIN_FAST_ROWS up through FrozenReducedQ; the
    values and gradients are the same either way."""
    monkeypatch.setattr(q_module, "MIN_FAST_ROWS", 1024)
    calls = []
    apply = FrozenReducedQ.apply
    monkeypatch.setattr(FrozenReducedQ, "apply", lambda *args: calls.append(1) or apply(*args))
    torch.manual_seed(0)
    q = QEnsemble(3, 2, (8, 8), members=2).double()
    s, a = torch.randn(b, 3, dtype=torch.float64), torch.randn(b, n, 2, dtype=torch.float64)
    a_ref, a_q = a.clone().requires_grad_(True), a.clone().requires_grad_(True)
    out = q.frozen_reduced(s, a_q, "min")
    assert bool(calls) == fast
    torch.testing.assert_close(out, _reference(q, s, a_ref, "min"))
    (g,) = torch.autograd.grad(out.sum(), a_q)
    (g_ref,) = torch.autograd.grad(_reference(q, s, a_ref, "min").sum(), a_ref)
    torch.testing.assert_close(g, g_ref)
