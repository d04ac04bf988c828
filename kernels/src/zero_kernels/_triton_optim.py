"""Triton kernels of the optimizer steps (imported only when Triton runs).

Each program updates one block of a flat tensor; all arithmetic is fp32.
"""

import triton
import triton.language as tl


@triton.jit
def adam_kernel(p_ptr, g_ptr, m_ptr, v_ptr, out_ptr, n, lr, beta1, beta2, eps, wd, step_size, bc2_sqrt,
                grad_scale, DECOUPLED: tl.constexpr, WRITE_LOWP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32) * grad_scale
    m = tl.load(m_ptr + offs, mask=mask)
    v = tl.load(v_ptr + offs, mask=mask)
    if not DECOUPLED:
        g = g + wd * p
    m = m + (1.0 - beta1) * (g - m)
    v = beta2 * v + (1.0 - beta2) * g * g
    if DECOUPLED:
        p = p * (1.0 - lr * wd)
    p = p - step_size * (m / (tl.sqrt(v) / bc2_sqrt + eps))
    tl.store(p_ptr + offs, p, mask=mask)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    if WRITE_LOWP:
        tl.store(out_ptr + offs, p.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def lion_kernel(p_ptr, g_ptr, m_ptr, out_ptr, n, lr, beta1, beta2, wd, grad_scale,
                WRITE_LOWP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32) * grad_scale
    m = tl.load(m_ptr + offs, mask=mask)
    c = beta1 * m + (1.0 - beta1) * g
    update = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0))
    p = p * (1.0 - lr * wd) - lr * update
    m = beta2 * m + (1.0 - beta2) * g
    tl.store(p_ptr + offs, p, mask=mask)
    tl.store(m_ptr + offs, m, mask=mask)
    if WRITE_LOWP:
        tl.store(out_ptr + offs, p.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def sgd_kernel(p_ptr, g_ptr, buf_ptr, out_ptr, n, lr, momentum, dampening, wd, grad_scale,
               FIRST_STEP: tl.constexpr, NESTEROV: tl.constexpr, WRITE_LOWP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32) * grad_scale
    g = g + wd * p
    if FIRST_STEP:
        buf = g
    else:
        buf = momentum * tl.load(buf_ptr + offs, mask=mask) + (1.0 - dampening) * g
    if NESTEROV:
        g = g + momentum * buf
    else:
        g = buf
    p = p - lr * g
    tl.store(p_ptr + offs, p, mask=mask)
    tl.store(buf_ptr + offs, buf, mask=mask)
    if WRITE_LOWP:
        tl.store(out_ptr + offs, p.to(out_ptr.dtype.element_ty), mask=mask)
