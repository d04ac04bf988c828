"""Triton kernel for rotary position embedding (imported only when Triton runs).

Arithmetic is in ``ACC``: fp32, or fp64 for fp64 input, as on the reference path.
"""

import triton
import triton.language as tl


@triton.jit
def rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, seq, heads, half, sign, ACC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # one (batch, position, head) vector of head_dim elements
    pos = (row // heads) % seq
    cols = tl.arange(0, BLOCK)
    mask = cols < half
    base = row * 2 * half
    x1 = tl.load(x_ptr + base + cols, mask=mask, other=0.0).to(ACC)
    x2 = tl.load(x_ptr + base + half + cols, mask=mask, other=0.0).to(ACC)
    c = tl.load(cos_ptr + pos * half + cols, mask=mask, other=0.0).to(ACC)
    s = tl.load(sin_ptr + pos * half + cols, mask=mask, other=0.0).to(ACC) * sign
    tl.store(out_ptr + base + cols, (x1 * c - x2 * s).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + base + half + cols, (x2 * c + x1 * s).to(out_ptr.dtype.element_ty), mask=mask)
