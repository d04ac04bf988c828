"""``deepspeed.ops.lion``: ``DeepSpeedCPULion`` and ``FusedLion``, Lion as standalone ``torch.optim.Optimizer``s
over zero-kernels' fused step (any device). Given to ``initialize`` as a client optimizer, either becomes zero's
sharded Lion rule with the same hyper-parameters."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

import zero_kernels

from .._flat import FlatStepOptimizer

__all__ = ["DeepSpeedCPULion", "FusedLion"]


class FusedLion(FlatStepOptimizer):
    """Lion (Chen et al., 2023): each parameter moves by ``lr`` times the sign of an interpolated momentum."""

    state_names = ("exp_avg",)

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.0, **_: Any):
        if lr < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"{type(self).__name__}: lr {lr} and weight_decay {weight_decay} must be >= 0 and "
                             f"betas {betas} in [0, 1)")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    def _kernel(self, param: torch.Tensor, grad: torch.Tensor, state: list[torch.Tensor], *, step: int,
                group: dict[str, Any], lowp_out: torch.Tensor | None) -> None:
        b1, b2 = group["betas"]
        zero_kernels.lion_step(param, grad, state[0], lr=group["lr"], beta1=b1, beta2=b2,
                               weight_decay=group["weight_decay"], lowp_out=lowp_out)


class DeepSpeedCPULion(FusedLion):
    """DeepSpeed's CPU Lion: the same step (DeepSpeed's ``fp32_optimizer_states`` is always true here)."""
