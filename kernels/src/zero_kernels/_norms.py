"""RMSNorm and LayerNorm over the last dimension, forward and backward.

Statistics and arithmetic are fp32 (fp64 for fp64 input, on every path); the output and the
input gradient take the input's dtype, the weight and bias gradients the
weight's. The forward saves only the per-row mean and 1/std, so the backward
re-derives the normalised input instead of keeping it. Off the Triton path, inputs
whose weight (and bias) share their dtype run torch's own ``F.layer_norm`` /
``F.rms_norm`` (faster on CPU, same results within rounding, torch's autograd);
mixed dtypes and ``ZERO_KERNELS=reference`` run the hand-written reference.

    RMSNorm:   y = x / sqrt(mean(x^2) + eps) * w
    LayerNorm: y = (x - mean(x)) / sqrt(var(x) + eps) * w + b
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import kernel_path, triton_acc, use_triton, warps_for

__all__ = ["layer_norm", "rms_norm"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm of ``x`` over its last dimension, scaled by ``weight``."""
    _check_shapes(x, weight, None)
    if _builtin(x, weight, None) and hasattr(F, "rms_norm"):  # F.rms_norm: torch >= 2.4
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return _Norm.apply(x, weight, None, eps, True)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm of ``x`` over its last dimension, with affine ``weight`` and optional ``bias``."""
    _check_shapes(x, weight, bias)
    if _builtin(x, weight, bias):
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return _Norm.apply(x, weight, bias, eps, False)


def _check_shapes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    n = x.shape[-1]
    if weight.shape != (n,) or (bias is not None and bias.shape != (n,)):
        raise ValueError(f"weight{'/bias' if bias is not None else ''} must have shape ({n},) "
                         f"to normalise a last dimension of {n}; got {tuple(weight.shape)}")


def _builtin(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """torch's op has the reference's meaning when x, weight and bias share a floating dtype."""
    same = weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype) and x.is_floating_point()
    return same and kernel_path(x, weight) == "torch"


class _Norm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, is_rms):
        n = x.shape[-1]
        rows = x.reshape(-1, n).contiguous()
        if use_triton(rows, weight):
            y, mean, rstd = _forward_triton(rows, weight, bias, eps, is_rms)
        else:
            y, mean, rstd = _forward_reference(rows, weight, bias, eps, is_rms)
        ctx.save_for_backward(rows, weight, mean, rstd)
        ctx.is_rms, ctx.has_bias, ctx.shape = is_rms, bias is not None, x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        rows, weight, mean, rstd = ctx.saved_tensors
        dy = dy.reshape(rows.shape).contiguous()
        if use_triton(rows, dy):
            dx, dw, db = _backward_triton(dy, rows, weight, mean, rstd, ctx.is_rms, ctx.has_bias)
        else:
            dx, dw, db = _backward_reference(dy, rows, weight, mean, rstd, ctx.is_rms, ctx.has_bias)
        return dx.view(ctx.shape), dw, db, None, None


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # fp32, or fp64 for fp64 inputs


def _forward_reference(rows, weight, bias, eps, is_rms):
    acc = _acc(rows.dtype)
    x = rows.to(acc)
    mean = torch.zeros(x.shape[0], dtype=acc, device=x.device) if is_rms else x.mean(-1)
    xc = x if is_rms else x - mean[:, None]
    rstd = torch.rsqrt(xc.square().mean(-1) + eps)
    y = xc * rstd[:, None] * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(rows.dtype), mean, rstd


def _backward_reference(dy, rows, weight, mean, rstd, is_rms, has_bias):
    acc = _acc(rows.dtype)
    dy32 = dy.to(acc)
    xhat = (rows.to(acc) - mean[:, None]) * rstd[:, None]
    wdy = dy32 * weight.to(acc)
    dx = wdy - xhat * (wdy * xhat).mean(-1, keepdim=True)
    if not is_rms:
        dx = dx - wdy.mean(-1, keepdim=True)
    dx = dx * rstd[:, None]
    dw = (dy32 * xhat).sum(0).to(weight.dtype)
    db = dy32.sum(0).to(weight.dtype) if has_bias else None
    return dx.to(rows.dtype), dw, db


def _block(n: int) -> int:
    import triton

    block = triton.next_power_of_2(n)
    if block > 65536:
        raise ValueError(f"the Triton norm kernels handle rows of up to 65536 elements, got {n}")
    return block


def _forward_triton(rows, weight, bias, eps, is_rms):
    from ._triton_norms import norm_forward_kernel

    m, n = rows.shape
    y = torch.empty_like(rows)
    mean = torch.empty(m, dtype=_acc(rows.dtype), device=rows.device)
    rstd = torch.empty(m, dtype=_acc(rows.dtype), device=rows.device)
    w = weight.contiguous()
    b = bias.contiguous() if bias is not None else w
    if m:
        block = _block(n)
        norm_forward_kernel[(m,)](rows, w, b, y, mean, rstd, n, eps, IS_RMS=is_rms, HAS_BIAS=bias is not None,
                                  ACC=triton_acc(rows.dtype), BLOCK=block, num_warps=warps_for(block))
    return y, mean, rstd


def _backward_triton(dy, rows, weight, mean, rstd, is_rms, has_bias):
    from ._triton_norms import norm_backward_kernel

    m, n = rows.shape
    programs = max(1, min(m, 256))
    per_program = -(-m // programs)
    programs = -(-m // per_program)
    dx = torch.empty_like(rows)
    dw_part = torch.empty(programs, n, dtype=_acc(rows.dtype), device=rows.device)
    db_part = torch.empty(programs, n, dtype=_acc(rows.dtype), device=rows.device) if has_bias else dw_part
    if m:
        norm_backward_kernel[(programs,)](dy, rows, weight.contiguous(), mean, rstd, dx, dw_part, db_part, m, n,
                                          per_program, IS_RMS=is_rms, HAS_BIAS=has_bias, ACC=triton_acc(rows.dtype),
                                          BLOCK=_block(n), num_warps=warps_for(_block(n)))
    else:
        dw_part.zero_()
    dw = dw_part.sum(0).to(weight.dtype)
    db = db_part.sum(0).to(weight.dtype) if has_bias else None
    return dx, dw, db
