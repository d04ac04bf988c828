"""``deepspeed.ops.lion``: ``DeepSpeedCPULion`` and ``FusedLion``, Lion as standalone ``torch.optim.Optimizer``s
over zero-kernels' fused step (any device). Given to ``initialize`` as a client optimizer, either becomes zero's
sharded Lion rule with the same hyper-parameters."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

import zero_kernels

__all__ = ["DeepSpeedCPULion", "FusedLion"]


class FusedLion(torch.optim.Optimizer):
    """Lion (Chen et al., 2023): each parameter moves by ``lr`` times the sign of an interpolated momentum."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.0, **_: Any):
        if lr < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"{type(self).__name__}: lr {lr} and weight_decay {weight_decay} must be >= 0 and "
                             f"betas {betas} in [0, 1)")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
                master = p if p.dtype == torch.float32 and p.is_contiguous() else None
                weight = master if master is not None else p.detach().float().contiguous()
                b1, b2 = group["betas"]
                zero_kernels.lion_step(weight.view(-1), p.grad.contiguous().view(-1), state["exp_avg"].view(-1),
                                       lr=group["lr"], beta1=b1, beta2=b2, weight_decay=group["weight_decay"])
                if master is None:
                    p.copy_(weight.view_as(p))
        return loss


class DeepSpeedCPULion(FusedLion):
    """DeepSpeed's CPU Lion: the same step (DeepSpeed's ``fp32_optimizer_states`` is always true here)."""
