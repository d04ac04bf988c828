"""RMSNorm and LayerNorm: forward and every gradient equal a float64 autograd computation."""

import pytest
import torch

import zero_kernels as zk

SHAPES = [(1, 8), (3, 5, 100), (17, 1000)]  # rows of non-power-of-two length
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float64: 1e-12}


def _naive(x, w, b, eps, is_rms):
    if is_rms:
        y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * w
    else:
        mu = x.mean(-1, keepdim=True)
        y = (x - mu) * torch.rsqrt((x - mu).square().mean(-1, keepdim=True) + eps) * w
    return y + b if b is not None else y


def _rel(got, want):
    return ((got.double().cpu() - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("kind", ["rms", "layer", "layer_no_bias"])
def test_norm_forward_and_backward_match_float64(path, shape, dtype, kind):
    g = torch.Generator().manual_seed(sum(shape))
    n = shape[-1]
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)
    w = (torch.rand(n, generator=g) + 0.5).to(dtype)
    b = (torch.randn(n, generator=g) * 0.1).to(dtype) if kind == "layer" else None
    dy = torch.randn(shape, generator=g).to(dtype)
    eps = 1e-5
    # float64 truth through autograd on the naive formula
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    b64 = b.double().requires_grad_() if b is not None else None
    y64 = _naive(x64, w64, b64, eps, kind == "rms")
    y64.backward(dy.double())
    # the op under test
    xt = x.to(path).requires_grad_()
    wt = w.to(path).requires_grad_()
    bt = b.to(path).requires_grad_() if b is not None else None
    y = zk.rms_norm(xt, wt, eps) if kind == "rms" else zk.layer_norm(xt, wt, bt, eps)
    y.backward(dy.to(path))
    assert y.dtype == dtype and y.shape == x.shape
    tol = TOL[dtype]
    assert _rel(y, y64.detach()) <= tol, "output"
    assert _rel(xt.grad, x64.grad) <= tol * 4, "input gradient"
    assert _rel(wt.grad, w64.grad) <= tol * 4, "weight gradient"
    if b is not None:
        assert _rel(bt.grad, b64.grad) <= tol * 4, "bias gradient"


def test_gradcheck_in_float64(path):
    """torch.autograd.gradcheck on each path's backward: the reference's hand-written one, torch's
    built-in, the Triton kernels (fp64 input is computed in fp64 there too)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, generator=g, dtype=torch.float64).to(path).requires_grad_()
    w = torch.rand(7, generator=g, dtype=torch.float64).to(path).requires_grad_()
    b = torch.randn(7, generator=g, dtype=torch.float64).to(path).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: zk.rms_norm(x, w, 1e-6), (x, w))
    assert torch.autograd.gradcheck(lambda x, w, b: zk.layer_norm(x, w, b, 1e-5), (x, w, b))


def test_wrong_weight_shape_is_named():
    with pytest.raises(ValueError, match=r"must have shape \(8,\)"):
        zk.rms_norm(torch.randn(2, 8), torch.ones(4))
