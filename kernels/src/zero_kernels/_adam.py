"""Fused Adam / AdamW step over flat fp32 shards.

One pass over memory per tensor: read parameter, gradient and both moments,
write parameter and moments back, and (optionally) a bf16/fp16 copy of the new
parameter for the model. The gradient may be fp32, bf16 or fp16 and is multiplied
by ``grad_scale`` first (``1 / loss_scale`` folds fp16 unscaling into the step).
CUDA tensors run the Triton kernel; CPU tensors run torch's fused CPU Adam kernel
over cache-sized chunks (the optimizer step of an offloaded ZeRO run: zero-optim's
``AdamW``/``Adam`` rules over host shards); anything else runs the formulas below.

The maths is exactly torch.optim.AdamW's (decoupled weight decay) or
torch.optim.Adam's (L2: the decay is added to the gradient)::

    g  = grad * grad_scale (+ weight_decay * p, for Adam)
    m  = beta1 * m + (1 - beta1) * g
    v  = beta2 * v + (1 - beta2) * g * g
    p  = p * (1 - lr * weight_decay)                  (AdamW)
    p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ._dispatch import as_tensor_lists, check_contiguous, grid_1d, require_fp32, use_triton

__all__ = ["adam_step"]

Tensors = torch.Tensor | list[torch.Tensor]

CPU_CHUNK = 1 << 20  # elements per chunk of the CPU step: 4 MiB per fp32 stream, 28 MiB touched per chunk


def adam_step(params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors, *, lr: float,
              beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
              step: int, decoupled: bool = True, grad_scale: float = 1.0,
              lowp_out: Tensors | None = None) -> None:
    """Update ``params`` and the moments in place; write the new weights into ``lowp_out`` if given.

    ``step`` is the 1-based step number used for bias correction.
    """
    if step < 1:
        raise ValueError(f"step must be >= 1 (1-based, for bias correction), got {step}")
    lists = as_tensor_lists(params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                            lowp_out=lowp_out)
    ps, gs, ms, vs, outs = (lists[k] for k in ("params", "grads", "exp_avgs", "exp_avg_sqs", "lowp_out"))
    assert ps is not None and gs is not None and ms is not None and vs is not None
    require_fp32(params=ps, exp_avgs=ms, exp_avg_sqs=vs)
    bc1 = 1.0 - beta1**step
    bc2_sqrt = math.sqrt(1.0 - beta2**step)
    for i in range(len(ps)):
        out = outs[i] if outs is not None else None
        args = (ps[i], gs[i], ms[i], vs[i], out, lr, beta1, beta2, eps, weight_decay, bc1, bc2_sqrt,
                grad_scale, decoupled)
        if use_triton(ps[i], gs[i]):
            _adam_triton(*args)
        else:
            _adam_reference(*args, step=step)


def _adam_reference(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None,
                    lr: float, beta1: float, beta2: float, eps: float, wd: float, bc1: float, bc2_sqrt: float,
                    grad_scale: float, decoupled: bool, *, step: int) -> None:
    """On CPU, torch's own fused Adam kernel, chunked (:func:`_adam_cpu`); elsewhere, the formulas."""
    fused = getattr(torch, "_fused_adamw_" if decoupled else "_fused_adam_", None)
    tensors = (p, g, m, v)
    if fused is not None and all(t.device.type == "cpu" and t.is_contiguous() for t in tensors):
        _adam_cpu(fused, p, g, m, v, out, lr, beta1, beta2, eps, wd, grad_scale, step=step)
        return
    _adam_formulas(p, g, m, v, out, lr, beta1, beta2, eps, wd, bc1, bc2_sqrt, grad_scale, decoupled)


def _adam_cpu(fused: Any, p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
              out: torch.Tensor | None, lr: float, beta1: float, beta2: float, eps: float, wd: float,
              grad_scale: float, *, step: int) -> None:
    """The CPU step: bound by memory bandwidth (28 bytes read and written per fp32 element against a handful
    of flops), so it makes one pass. torch's fused kernel (what ``torch.optim.AdamW(fused=True)`` runs:
    vectorised, spread over the intra-op threads) steps ``CPU_CHUNK`` elements at a time, small enough to stay in
    cache while that chunk's bf16/fp16 gradient is widened and its new weights are written to ``out``.
    With an fp32 gradient and no ``out`` there is nothing to do around the kernel: one call. The chunk is a
    multiple of any SIMD width, so the kernel rounds each element as it would in one call."""
    chunk = CPU_CHUNK
    kwargs: dict[str, Any] = {
        "lr": lr, "beta1": beta1, "beta2": beta2, "weight_decay": wd, "eps": eps, "amsgrad": False,
        "maximize": False, "found_inf": None,
        # torch's kernel divides the gradient by its grad_scale: hand it the reciprocal of ours
        "grad_scale": None if grad_scale == 1.0 else torch.tensor(1.0 / grad_scale),
    }
    steps = [torch.tensor(float(step))]
    pf, gf, mf, vf = (t.view(-1) for t in (p, g, m, v))
    # the weight copy is written chunk by chunk where it is contiguous (a strided view: once, at the end)
    out_flat = out.view(-1) if out is not None and out.is_contiguous() else None
    if out is None and gf.dtype == torch.float32:
        fused([pf], [gf], [mf], [vf], [], steps, **kwargs)
        return
    for s in range(0, pf.numel(), chunk):
        e = min(s + chunk, pf.numel())
        g32 = gf[s:e] if gf.dtype == torch.float32 else gf[s:e].to(torch.float32)
        fused([pf[s:e]], [g32], [mf[s:e]], [vf[s:e]], [], steps, **kwargs)
        if out_flat is not None:
            out_flat[s:e].copy_(pf[s:e])
    if out is not None and out_flat is None:
        out.copy_(p.view_as(out))


def _adam_formulas(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None,
                   lr: float, beta1: float, beta2: float, eps: float, wd: float, bc1: float, bc2_sqrt: float,
                   grad_scale: float, decoupled: bool) -> None:
    g = g.to(torch.float32)
    if grad_scale != 1.0:
        g = g * grad_scale
    if not decoupled and wd:
        g = g.add(p, alpha=wd)
    m.lerp_(g, 1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    if decoupled and wd:
        p.mul_(1.0 - lr * wd)
    denom = (v.sqrt() / bc2_sqrt).add_(eps)
    p.addcdiv_(m, denom, value=-lr / bc1)
    if out is not None:
        out.copy_(p.view_as(out))


def _adam_triton(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None,
                 lr: float, beta1: float, beta2: float, eps: float, wd: float, bc1: float, bc2_sqrt: float,
                 grad_scale: float, decoupled: bool) -> None:
    from ._triton_optim import adam_kernel

    check_contiguous(params=p, grads=g, exp_avgs=m, exp_avg_sqs=v, lowp_out=out)
    n = p.numel()
    if n == 0:
        return
    programs, block = grid_1d(n)
    adam_kernel[(programs,)](
        p, g, m, v, out if out is not None else p, n, lr, beta1, beta2, eps, wd, lr / bc1, bc2_sqrt,
        grad_scale, DECOUPLED=decoupled, WRITE_LOWP=out is not None, BLOCK=block)
