"""Rotary embedding: forward and backward equal a float64 computation; gradcheck passes."""

import pytest
import torch

import zero_kernels as zk

TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-12}


def _naive(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


@pytest.mark.parametrize("shape", [(1, 3, 1, 2), (2, 7, 3, 20), (2, 33, 4, 64)], ids=str)
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
def test_rotary_matches_float64(path, shape, dtype):
    g = torch.Generator().manual_seed(shape[1])
    x = torch.randn(shape, generator=g).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    cos, sin = zk.rotary_tables(shape[1], shape[-1])
    x64 = x.double().requires_grad_()
    y64 = _naive(x64, cos.double(), sin.double())
    y64.backward(dy.double())
    xt = x.to(path).requires_grad_()
    y = zk.apply_rotary(xt, cos.to(path), sin.to(path))
    y.backward(dy.to(path))
    assert y.dtype == dtype
    assert (y.double().cpu() - y64.detach()).abs().max() <= TOL[dtype] * y64.abs().max()
    assert (xt.grad.double().cpu() - x64.grad).abs().max() <= TOL[dtype] * x64.grad.abs().max()


def test_rotation_preserves_norm_and_gradcheck(path):
    x = torch.randn(2, 5, 2, 8, dtype=torch.float64, device=path, requires_grad=True)
    cos, sin = zk.rotary_tables(5, 8, device=path, dtype=torch.float64)
    y = zk.apply_rotary(x, cos, sin)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1))
    assert torch.autograd.gradcheck(lambda x: zk.apply_rotary(x, cos, sin), (x,))


def test_bad_shapes_are_named():
    cos, sin = zk.rotary_tables(4, 8)
    with pytest.raises(ValueError, match=r"cos and sin must have shape \(5, 4\)"):
        zk.apply_rotary(torch.randn(1, 5, 2, 8), cos, sin)
    with pytest.raises(ValueError, match="head_dim must be even"):
        zk.rotary_tables(4, 7)
