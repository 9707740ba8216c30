"""``mbvi._private_torch``: every private fast path agrees with its plain fallback, and
both with a closed form, so a torch without one loses speed, not correctness."""

import pytest
import torch

from mbvi import _private_torch as pt


def test_private_torch_probes_agree_with_their_plain_fallbacks():
    """``mbvi._private_torch``: the foreach fast paths (when this torch has them) give
    what the plain loops give, and both the Polyak average's closed form, so a torch
    without them loses speed, not correctness."""
    g = torch.Generator().manual_seed(0)
    sources = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    start = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    fast, plain = [t.clone() for t in start], [t.clone() for t in start]
    pt.polyak_(fast, sources, 0.05)
    pt.plain_polyak_(plain, sources, 0.05)
    for f, p, t, s in zip(fast, plain, start, sources):
        torch.testing.assert_close(f, t + 0.05 * (s - t))
        torch.testing.assert_close(p, t + 0.05 * (s - t))
    pt.add_(fast, 1.0)
    pt.plain_add_(plain, 1.0)
    for f, p, t, s in zip(fast, plain, start, sources):
        torch.testing.assert_close(f, t + 0.05 * (s - t) + 1.0)
        torch.testing.assert_close(p, f)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_relu_is_relu_of_an_affine_map(dtype, monkeypatch):
    """Fused (float32 CPU, where the probe passed) and plain: relu(x w_tᵀ + b)."""
    g = torch.Generator().manual_seed(1)
    x, w_t, b = (torch.randn(*s, generator=g, dtype=dtype) for s in ((9, 6), (4, 6), (4,)))
    want = torch.relu(x @ w_t.t() + b)
    torch.testing.assert_close(pt.linear_relu(x, w_t, b), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pt.plain_linear_relu(x, w_t, b), want)
    monkeypatch.setattr(pt, "_LINEAR_RELU_OK", False)
    assert not pt.linear_relu_fused(x)
    torch.testing.assert_close(pt.linear_relu(x, w_t, b), want)


def test_linear_relu_probe_refuses_a_build_without_the_op(monkeypatch):
    monkeypatch.setattr(pt, "LINEAR_RELU_OP", None)
    assert not pt._probe_linear_relu()


@pytest.mark.parametrize("use_kernel", [True, False], ids=["kernel", "plain"])
def test_relu_backward_masks_where_the_output_is_not_positive(use_kernel, monkeypatch):
    monkeypatch.setattr(pt, "_RELU_BACKWARD_OK", use_kernel and pt._RELU_BACKWARD_OK)
    g = torch.Generator().manual_seed(2)
    grad = torch.randn(6, 5, generator=g)
    out = torch.relu(torch.randn(6, 5, generator=g))
    want = torch.where(out > 0, grad, torch.zeros(()))
    got = pt.relu_backward_(grad, out)
    torch.testing.assert_close(got, want)
    assert got.data_ptr() == out.data_ptr(), "the result is written into the activations"
    x = torch.randn(6, 5, generator=g, requires_grad=True)
    y = torch.relu(x)
    (autograd,) = torch.autograd.grad(y, x, grad)
    torch.testing.assert_close(pt.relu_backward_(grad, y.detach().clone()), autograd)
