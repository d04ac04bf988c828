"""Fused Lion step (Chen et al., 2023) over flat fp32 shards.

    c = beta1 * m + (1 - beta1) * g
    p = p * (1 - lr * weight_decay) - lr * sign(c)
    m = beta2 * m + (1 - beta2) * g
"""

from __future__ import annotations

import torch

from ._dispatch import as_tensor_lists, check_contiguous, grid_1d, require_fp32, use_triton

__all__ = ["lion_step"]

Tensors = torch.Tensor | list[torch.Tensor]


def lion_step(params: Tensors, grads: Tensors, exp_avgs: Tensors, *, lr: float, beta1: float = 0.9,
              beta2: float = 0.99, weight_decay: float = 0.0, grad_scale: float = 1.0,
              lowp_out: Tensors | None = None) -> None:
    """Update ``params`` and ``exp_avgs`` in place (and the low-precision copy, if given)."""
    lists = as_tensor_lists(params=params, grads=grads, exp_avgs=exp_avgs, lowp_out=lowp_out)
    ps, gs, ms, outs = lists["params"], lists["grads"], lists["exp_avgs"], lists["lowp_out"]
    assert ps is not None and gs is not None and ms is not None
    require_fp32(params=ps, exp_avgs=ms)
    for i, (p, g, m) in enumerate(zip(ps, gs, ms, strict=True)):
        out = outs[i] if outs is not None else None
        if use_triton(p, g):
            _lion_triton(p, g, m, out, lr, beta1, beta2, weight_decay, grad_scale)
            continue
        g32 = g.to(torch.float32) * grad_scale
        update = (m * beta1).add_(g32, alpha=1.0 - beta1).sign_()
        if weight_decay:
            p.mul_(1.0 - lr * weight_decay)
        p.add_(update, alpha=-lr)
        m.mul_(beta2).add_(g32, alpha=1.0 - beta2)
        if out is not None:
            out.copy_(p.view_as(out))


def _lion_triton(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, out: torch.Tensor | None, lr: float,
                 beta1: float, beta2: float, wd: float, grad_scale: float) -> None:
    from ._triton_optim import lion_kernel

    check_contiguous(params=p, grads=g, exp_avgs=m, lowp_out=out)
    if p.numel() == 0:
        return
    programs, block = grid_1d(p.numel())
    lion_kernel[(programs,)](p, g, m, out if out is not None else p, p.numel(), lr, beta1, beta2, wd, grad_scale,
                             WRITE_LOWP=out is not None, BLOCK=block)
