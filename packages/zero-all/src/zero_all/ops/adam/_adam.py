"""DeepSpeed's Adam optimizers as ``torch.optim.Optimizer`` subclasses over zero's fused steps.

Each parameter is one flat step: weight, gradient and both moments read and written
in one pass. A parameter that is not fp32 (bf16, fp16) keeps an fp32 master copy in
its state, and the step writes the new weights back into it in its own dtype, as a
mixed-precision optimizer does. ``defaults`` and every ``param_groups`` entry carry
``lr``, ``betas``, ``eps``, ``weight_decay``, ``bias_correction`` and ``adam_w_mode``
(decoupled weight decay, torch's AdamW; off: L2 decay added to the gradient, torch's Adam).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

import zero_kernels

from .._flat import FlatStepOptimizer

__all__ = ["DeepSpeedCPUAdam", "FusedAdam"]


class _Adam(FlatStepOptimizer):
    def __init__(self, params: Iterable[Any], *, lr: float, bias_correction: bool, betas: tuple[float, float],
                 eps: float, weight_decay: float, amsgrad: bool, adam_w_mode: bool):
        name = type(self).__name__
        if amsgrad:
            raise NotImplementedError(f"{name}(amsgrad=True) is not supported (DeepSpeed's fused Adam has no "
                                      "AMSGrad either)")
        if not bias_correction:
            raise NotImplementedError(f"{name}(bias_correction=False) is not supported: zero's Adam step always "
                                      "corrects the moments' bias (torch.optim.Adam's maths)")
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"{name}: lr {lr}, eps {eps}, weight_decay {weight_decay} must be >= 0 and betas "
                             f"{betas} in [0, 1)")
        defaults = {"lr": lr, "bias_correction": bias_correction, "betas": tuple(betas), "eps": eps,
                    "weight_decay": weight_decay, "adam_w_mode": adam_w_mode}
        super().__init__(params, defaults)
        self.adam_w_mode = adam_w_mode

    state_names = ("exp_avg", "exp_avg_sq")

    def _kernel(self, param: torch.Tensor, grad: torch.Tensor, state: list[torch.Tensor], *, step: int,
                group: dict[str, Any], lowp_out: torch.Tensor | None) -> None:
        """zero-kernels' step: Triton on CUDA, torch's fused kernel over chunks on the CPU."""
        b1, b2 = group["betas"]
        exp_avg, exp_avg_sq = state
        zero_kernels.adam_step(param, grad, exp_avg, exp_avg_sq, lr=group["lr"], beta1=b1, beta2=b2, eps=group["eps"],
                               weight_decay=group["weight_decay"], step=step, decoupled=group["adam_w_mode"],
                               lowp_out=lowp_out)


class FusedAdam(_Adam):
    """DeepSpeed's ``FusedAdam``: Adam/AdamW on any device through zero-kernels' fused step (Triton on
    CUDA, torch's fused kernel on the CPU). ``set_grad_none``: ``zero_grad()`` sets gradients to
    ``None`` (else zeroes them)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, bias_correction: bool = True,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, adam_w_mode: bool = True,
                 weight_decay: float = 0.0, amsgrad: bool = False, set_grad_none: bool = True):
        super().__init__(params, lr=lr, bias_correction=bias_correction, betas=betas, eps=eps,
                         weight_decay=weight_decay, amsgrad=amsgrad, adam_w_mode=adam_w_mode)
        self.set_grad_none = set_grad_none

    def zero_grad(self, set_to_none: bool | None = None) -> None:
        super().zero_grad(self.set_grad_none if set_to_none is None else set_to_none)


class DeepSpeedCPUAdam(_Adam):
    """DeepSpeed's ``DeepSpeedCPUAdam``: Adam/AdamW over parameters in host memory, through zero-kernels'
    CPU step (torch's vectorised fused kernel over cache-sized chunks, no compiled extension).
    ``fp32_optimizer_states=False`` (moments in the parameters' dtype) is refused: the CPU step keeps
    fp32 state."""

    def __init__(self, model_params: Iterable[Any], lr: float = 1e-3, bias_correction: bool = True,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 amsgrad: bool = False, adamw_mode: bool = True, fp32_optimizer_states: bool = True):
        if not fp32_optimizer_states:
            raise NotImplementedError("DeepSpeedCPUAdam(fp32_optimizer_states=False) is not supported: the CPU "
                                      "step keeps its moments in fp32")
        super().__init__(model_params, lr=lr, bias_correction=bias_correction, betas=betas, eps=eps,
                         weight_decay=weight_decay, amsgrad=amsgrad, adam_w_mode=adamw_mode)
        for group in self.param_groups:
            for p in group["params"]:
                if p.device.type != "cpu":
                    raise ValueError(f"DeepSpeedCPUAdam steps parameters in host memory; one of shape "
                                     f"{tuple(p.shape)} is on {p.device} (use FusedAdam, or offload_optimizer in "
                                     "the config)")
