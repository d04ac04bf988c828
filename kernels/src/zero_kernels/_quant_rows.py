"""Row-wise blockwise int8 quantisation: each row of a 2-D tensor quantised on its own.

The rows of a ``(rows, cols)`` tensor are what a quantised collective sends to (or
receives from) each rank: every row is cut into blocks of ``block_size`` elements
from its own start (its last block may be short, and no block spans two rows), and
each block gets one fp32 scale, exactly as :func:`quantize_int8` treats a flat
tensor. So a row can be dequantised by whoever receives it alone, and no padding
travels. The reference is :func:`quantize_int8` applied row by row; the CPU path is
one vectorised formula with the same bits; CUDA runs one Triton launch over every
block of every row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import check_contiguous, kernel_path
from ._quant import _check_block, _quantize_rows, dequantize_int8, quantize_int8

__all__ = ["dequantize_int8_rows", "quantize_int8_rows"]


def _check_2d(t: torch.Tensor, what: str) -> None:
    if t.dim() != 2:
        raise ValueError(f"{what} must be 2-D (rows, cols), got shape {tuple(t.shape)}")


def quantize_int8_rows(x: torch.Tensor, block_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scales)``: ``q`` int8 of ``x``'s shape, ``scales`` fp32 of shape ``(rows, ceil(cols / block_size))``."""
    _check_block(block_size)
    _check_2d(x, "quantize_int8_rows' input")
    if not x.is_floating_point():
        raise ValueError(f"quantize_int8_rows needs a floating-point tensor, got {x.dtype}")
    rows, cols = x.shape
    blocks = -(-cols // block_size)
    path = kernel_path(x)
    if path == "triton":
        from ._triton_reduce import quantize_kernel

        check_contiguous(x=x)
        q = torch.empty(rows, cols, dtype=torch.int8, device=x.device)
        scales = torch.empty(rows, blocks, dtype=torch.float32, device=x.device)
        if x.numel():
            quantize_kernel[(blocks, rows)](x, q, scales, cols, blocks, BLOCK=block_size)
        return q, scales
    if path == "torch":
        padded = F.pad(x.to(torch.float32), (0, blocks * block_size - cols))
        q, scales = _quantize_rows(padded.reshape(rows * blocks, block_size))
        return q.view(rows, blocks * block_size)[:, :cols].contiguous(), scales.view(rows, blocks)
    parts = [quantize_int8(row, block_size) for row in x]
    if not parts:
        return x.new_empty(0, cols, dtype=torch.int8), x.new_empty(0, blocks, dtype=torch.float32)
    return torch.stack([q for q, _ in parts]), torch.stack([s for _, s in parts])


def dequantize_int8_rows(q: torch.Tensor, scales: torch.Tensor, block_size: int = 256,
                         dtype: torch.dtype = torch.float32, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``q * scale`` row by row, as ``dtype`` (or into ``out``, a contiguous tensor of ``q``'s shape)."""
    _check_block(block_size)
    _check_2d(q, "dequantize_int8_rows' values")
    rows, cols = q.shape
    blocks = -(-cols // block_size)
    if tuple(scales.shape) != (rows, blocks):
        raise ValueError(f"scales of shape {tuple(scales.shape)} do not match {rows} rows of {cols} values in "
                         f"blocks of {block_size} (want {(rows, blocks)})")
    if out is None:
        out = torch.empty(rows, cols, dtype=dtype, device=q.device)
    elif tuple(out.shape) != (rows, cols) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous tensor of shape {(rows, cols)}, got {tuple(out.shape)}")
    path = kernel_path(q)
    if path == "triton":
        from ._triton_reduce import dequantize_kernel

        check_contiguous(q=q, scales=scales)
        if q.numel():
            dequantize_kernel[(blocks, rows)](q, scales, out, cols, blocks, BLOCK=block_size)
        return out
    if path == "torch":
        padded = F.pad(q.to(torch.float32), (0, blocks * block_size - cols))
        values = padded.view(rows * blocks, block_size) * scales.reshape(-1, 1)
        out.copy_(values.view(rows, blocks * block_size)[:, :cols])
        return out
    for i in range(rows):
        out[i] = dequantize_int8(q[i], scales[i], block_size, out.dtype)
    return out
