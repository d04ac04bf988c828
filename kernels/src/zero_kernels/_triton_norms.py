"""Triton kernels for RMSNorm and LayerNorm (imported only when Triton runs).

One program normalises one row in the forward; in the backward each program
walks a run of rows, writes their input gradients and accumulates its share of
the weight (and bias) gradients, which the caller sums over programs. Arithmetic,
the saved statistics and the partial sums are in ``ACC``: fp32, or fp64 for fp64
input, as on the reference path.
"""

import triton
import triton.language as tl


@triton.jit
def norm_forward_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, n_cols, eps,
                        IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(ACC)
    if IS_RMS:
        mean = tl.sum(x, axis=0) * 0.0  # a tensor, like LayerNorm's, so both store the same way
        xc = x
    else:
        mean = tl.sum(x, axis=0) / n_cols
        xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(ACC)
    y = xc * rstd * w
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=mask, other=0.0).to(ACC)
    tl.store(y_ptr + row * n_cols + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def norm_backward_kernel(dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_part_ptr, db_part_ptr,
                         n_rows, n_cols, rows_per_program,
                         IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(ACC)
    dw = tl.zeros([BLOCK], dtype=ACC)
    db = tl.zeros([BLOCK], dtype=ACC)
    first = pid * rows_per_program
    for i in range(0, rows_per_program):
        row = (first + i).to(tl.int64)
        if row < n_rows:
            x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(ACC)
            dy = tl.load(dy_ptr + row * n_cols + cols, mask=mask, other=0.0).to(ACC)
            rstd = tl.load(rstd_ptr + row)
            xhat = tl.where(mask, (x - tl.load(mean_ptr + row)) * rstd, 0.0)
            wdy = w * dy
            c2 = tl.sum(wdy * xhat, axis=0) / n_cols
            if IS_RMS:
                dx = (wdy - xhat * c2) * rstd
            else:
                c1 = tl.sum(wdy, axis=0) / n_cols
                dx = (wdy - c1 - xhat * c2) * rstd
            tl.store(dx_ptr + row * n_cols + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            dw += dy * xhat
            if HAS_BIAS:
                db += dy
    tl.store(dw_part_ptr + pid * n_cols + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(db_part_ptr + pid * n_cols + cols, db, mask=mask)
