"""Row-wise int8 quantisation (what a quantised collective sends each rank): every row is quantised on its
own, bit for bit as the flat quantisation of that row, and round-trips within half a step of its block."""

import pytest
import torch

import zero_kernels as zk


def _rows(rows: int, cols: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(rows * 1000 + cols)
    scale = torch.logspace(-2, 2, cols).repeat(rows, 1)  # a wide range inside each row
    return (torch.randn(rows, cols, generator=g) * scale).to(dtype).to(device)


@pytest.mark.parametrize("shape", [(1, 300), (4, 255), (4, 256), (3, 1000), (8, 17)])
@pytest.mark.parametrize("block", [64, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_each_row_round_trips_within_half_a_step(path, shape, block, dtype):
    x = _rows(*shape, dtype, path)
    q, scales = zk.quantize_int8_rows(x, block)
    rows, cols = shape
    assert q.dtype == torch.int8 and q.shape == shape
    assert scales.dtype == torch.float32 and scales.shape == (rows, -(-cols // block))
    y = zk.dequantize_int8_rows(q, scales, block)
    step = scales.cpu().double().repeat_interleave(block, dim=1)[:, :cols]
    err = (y.double().cpu() - x.double().cpu()).abs()
    assert (err <= step / 2 * (1 + 1e-5) + 1e-12).all()
    assert q.abs().max().item() <= 127
    for i in range(rows):  # a row quantised alone, as its receiver dequantises it alone
        q1, s1 = zk.quantize_int8(x[i].contiguous(), block)
        assert torch.equal(q[i].cpu(), q1.cpu()) and torch.equal(scales[i].cpu(), s1.cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dequantize_writes_into_out(path, dtype):
    x = _rows(4, 100, torch.float32, path)
    q, scales = zk.quantize_int8_rows(x, 32)
    out = torch.full((4, 100), 7.0, dtype=dtype, device=path)
    got = zk.dequantize_int8_rows(q, scales, 32, out=out)
    assert got is out
    assert torch.equal(out.cpu(), zk.dequantize_int8_rows(q, scales, 32, dtype).cpu())


def test_relative_error_of_gaussian_rows_is_under_one_percent():
    x = torch.randn(4, 4096, generator=torch.Generator().manual_seed(0))
    q, scales = zk.quantize_int8_rows(x, 256)
    y = zk.dequantize_int8_rows(q, scales, 256)
    assert ((y - x).norm() / x.norm()).item() < 0.01


def test_bad_shapes_are_refused_by_name():
    with pytest.raises(ValueError, match="2-D"):
        zk.quantize_int8_rows(torch.zeros(10), 64)
    q, s = zk.quantize_int8_rows(torch.zeros(2, 100), 64)
    assert q.eq(0).all() and s.eq(0).all()
    with pytest.raises(ValueError, match="do not match"):
        zk.dequantize_int8_rows(q, s[:, :1], 64)
    with pytest.raises(ValueError, match="out must be"):
        zk.dequantize_int8_rows(q, s, 64, out=torch.empty(2, 99))
