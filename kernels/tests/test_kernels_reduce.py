"""Global gradient norm with its inf/NaN flag, and blockwise int8 quantisation."""

import pytest
import torch

import zero_kernels as zk


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_grad_norm_matches_float64(path, dtype):
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(n, generator=g).to(dtype).to(path) for n in (1, 1000, 1025, 4099)]
    norm, bad = zk.global_grad_norm(tensors)
    want = torch.cat([t.double().cpu() for t in tensors]).norm()
    assert abs(norm.item() - want.item()) <= 1e-5 * want.item()
    assert not bad.item()


@pytest.mark.parametrize("poison", [float("inf"), float("-inf"), float("nan")])
def test_nonfinite_gradient_is_flagged(path, poison):
    tensors = [torch.randn(100, device=path), torch.randn(1025, device=path)]
    tensors[1][1024] = poison
    _, bad = zk.grad_norm_sq(tensors)
    assert bad.item()


def test_large_finite_gradient_is_not_called_an_overflow(path):
    _, bad = zk.grad_norm_sq([torch.full((4,), 1e20, device=path)])  # its square overflows fp32
    assert not bad.item()


@pytest.mark.parametrize("n", [1, 255, 256, 1000, 4099])
@pytest.mark.parametrize("block", [64, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_int8_round_trip_error_is_within_half_a_step(path, n, block, dtype):
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=g) * torch.logspace(-2, 2, n)).to(dtype).to(path)
    q, scales = zk.quantize_int8(x, block)
    assert q.dtype == torch.int8 and q.numel() == n and scales.numel() == -(-n // block)
    xd = x.double().cpu()
    pad = torch.zeros(scales.numel() * block, dtype=torch.float64)
    pad[:n] = xd
    want_scales = pad.view(-1, block).abs().amax(1) / 127
    assert torch.allclose(scales.double().cpu(), want_scales, rtol=1e-6)
    y = zk.dequantize_int8(q, scales, block)
    step = want_scales.repeat_interleave(block)[:n]
    assert ((y.double().cpu() - xd).abs() <= step / 2 * (1 + 1e-5) + 1e-12).all()
    assert q.abs().max().item() <= 127


def test_int8_zero_block_and_bad_block_size():
    q, s = zk.quantize_int8(torch.zeros(100), 64)
    assert q.eq(0).all() and s.eq(0).all()
    assert zk.dequantize_int8(q, s, 64).eq(0).all()
    with pytest.raises(ValueError, match="power of two"):
        zk.quantize_int8(torch.zeros(10), 100)
    with pytest.raises(ValueError, match="do not match"):
        zk.dequantize_int8(q, s[:1], 64)
