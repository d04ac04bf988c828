"""Triton kernels for reductions and blockwise quantisation (imported only when Triton runs)."""

import triton
import triton.language as tl


@triton.jit
def sumsq_kernel(x_ptr, sums_ptr, bad_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    finite = (x == x) & (tl.abs(x) < float("inf"))
    tl.store(sums_ptr + pid, tl.sum(x * x, axis=0))
    tl.store(bad_ptr + pid, tl.sum((~finite).to(tl.int32), axis=0))


@triton.jit
def _row_block(cols, blocks_per_row, BLOCK: tl.constexpr):
    """This program's block of a (rows, cols) tensor: element offsets, their mask, the scale's index."""
    blk = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    col = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return row * cols + col, col < cols, row * blocks_per_row + blk


@triton.jit
def quantize_kernel(x_ptr, q_ptr, scale_ptr, cols, blocks_per_row, BLOCK: tl.constexpr):
    """Grid (blocks_per_row, rows): one block of one row of a (rows, cols) tensor; blocks never cross rows."""
    offs, mask, scale_at = _row_block(cols, blocks_per_row, BLOCK)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.max(tl.abs(x), axis=0) / 127.0
    y = tl.where(scale > 0, x / scale, 0.0)
    r = tl.floor(tl.abs(y) + 0.5)
    q = tl.minimum(tl.where(y < 0, -r, r), 127.0)
    q = tl.maximum(q, -127.0)
    tl.store(q_ptr + offs, q.to(tl.int8), mask=mask)
    tl.store(scale_ptr + scale_at, scale)


@triton.jit
def dequantize_kernel(q_ptr, scale_ptr, out_ptr, cols, blocks_per_row, BLOCK: tl.constexpr):
    """Grid (blocks_per_row, rows), as :func:`quantize_kernel`."""
    offs, mask, scale_at = _row_block(cols, blocks_per_row, BLOCK)
    q = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.float32)
    scale = tl.load(scale_ptr + scale_at)
    tl.store(out_ptr + offs, (q * scale).to(out_ptr.dtype.element_ty), mask=mask)
