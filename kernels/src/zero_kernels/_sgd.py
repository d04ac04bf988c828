"""Fused SGD-with-momentum step over flat fp32 shards, with torch.optim.SGD's semantics.

    g   = grad * grad_scale + weight_decay * p
    buf = g                                        (first step)
    buf = momentum * buf + (1 - dampening) * g     (later steps)
    p  -= lr * (g + momentum * buf if nesterov else buf)
"""

from __future__ import annotations

import torch

from ._dispatch import as_tensor_lists, check_contiguous, grid_1d, require_fp32, use_triton

__all__ = ["sgd_step"]

Tensors = torch.Tensor | list[torch.Tensor]


def sgd_step(params: Tensors, grads: Tensors, momentum_buffers: Tensors, *, lr: float, momentum: float = 0.9,
             dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, first_step: bool,
             grad_scale: float = 1.0, lowp_out: Tensors | None = None) -> None:
    """Update ``params`` and ``momentum_buffers`` in place; ``first_step`` initialises the buffers."""
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("nesterov momentum needs momentum > 0 and dampening == 0")
    lists = as_tensor_lists(params=params, grads=grads, momentum_buffers=momentum_buffers, lowp_out=lowp_out)
    ps, gs, bufs, outs = lists["params"], lists["grads"], lists["momentum_buffers"], lists["lowp_out"]
    assert ps is not None and gs is not None and bufs is not None
    require_fp32(params=ps, momentum_buffers=bufs)
    for i, (p, g, buf) in enumerate(zip(ps, gs, bufs, strict=True)):
        out = outs[i] if outs is not None else None
        if use_triton(p, g):
            _sgd_triton(p, g, buf, out, lr, momentum, dampening, weight_decay, nesterov, first_step, grad_scale)
            continue
        d = g.to(torch.float32) * grad_scale
        if weight_decay:
            d = d.add(p, alpha=weight_decay)
        if first_step:
            buf.copy_(d)
        else:
            buf.mul_(momentum).add_(d, alpha=1.0 - dampening)
        d = d.add(buf, alpha=momentum) if nesterov else buf
        p.add_(d, alpha=-lr)
        if out is not None:
            out.copy_(p.view_as(out))


def _sgd_triton(p: torch.Tensor, g: torch.Tensor, buf: torch.Tensor, out: torch.Tensor | None, lr: float,
                momentum: float, dampening: float, wd: float, nesterov: bool, first_step: bool,
                grad_scale: float) -> None:
    from ._triton_optim import sgd_kernel

    check_contiguous(params=p, grads=g, momentum_buffers=buf, lowp_out=out)
    if p.numel() == 0:
        return
    programs, block = grid_1d(p.numel())
    sgd_kernel[(programs,)](p, g, buf, out if out is not None else p, p.numel(), lr, momentum, dampening, wd,
                            grad_scale, FIRST_STEP=first_step, NESTEROV=nesterov, WRITE_LOWP=out is not None,
                            BLOCK=block)
