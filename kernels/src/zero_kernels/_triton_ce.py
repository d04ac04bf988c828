"""Triton kernel for the cross-entropy part of fused linear + cross-entropy (imported only when Triton runs).

One program per row of a logits chunk: an online max/sum pass gives the
log-sum-exp, then a second pass overwrites the logits, in place, with the
gradient of the loss, ``(softmax - onehot(target)) * scale``.
"""

import triton
import triton.language as tl


@triton.jit
def ce_grad_kernel(logits_ptr, target_ptr, loss_ptr, n_cols, ignore_index, scale, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * n_cols
    target = tl.load(target_ptr + row)
    valid = target != ignore_index
    safe_target = tl.where(valid, target, 0)
    m = float("-inf")
    d = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)
    x_target = tl.load(base + safe_target).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - x_target, 0.0))
    row_scale = tl.where(valid, scale, 0.0)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) - tl.where(cols == safe_target, 1.0, 0.0)
        tl.store(base + cols, (g * row_scale).to(logits_ptr.dtype.element_ty), mask=mask)
