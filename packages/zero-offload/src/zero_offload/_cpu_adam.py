"""The CPU optimizer step: Adam/AdamW over host fp32 shards, in place, one pass over memory.

An Adam step on a CPU is bound by memory bandwidth: per fp32 parameter it must
read the weight, gradient and both moments and write the weight and moments back,
28 bytes, against a handful of flops. torch's fused CPU Adam kernel
(``torch._fused_adamw_``, what ``torch.optim.AdamW(fused=True)`` runs) is
vectorised and spread over torch's intra-op threads; we call it, and add what an
offloaded optimizer needs around it without another pass over memory: the step
runs over chunks small enough to stay in cache, and each chunk's new weights are
written to the low-precision copy the device will read (and a bf16/fp16 gradient
widened to fp32) while the chunk is still in cache.

:class:`CPUAdam` is that step as an update rule: it satisfies zero-optim's
``UpdateRule`` protocol structurally (same name, hyper-parameters and state as
zero-optim's ``AdamW``/``Adam``, so checkpoints move between the two).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["CPUAdam", "cpu_adam_step"]

CHUNK = 1 << 20  # elements per chunk: 4 MiB per fp32 stream, 28 MiB touched per chunk


def cpu_adam_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
                  step: int, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                  weight_decay: float = 0.0, decoupled: bool = True, grad_scale: float = 1.0,
                  lowp_out: torch.Tensor | None = None, chunk: int = CHUNK) -> None:
    """One Adam (``decoupled=False``) or AdamW step on flat CPU tensors, in place.

    ``param``, ``exp_avg`` and ``exp_avg_sq`` are fp32; ``grad`` may be fp32, bf16 or
    fp16 and is multiplied by ``grad_scale`` (the clip factor over the loss scale).
    ``lowp_out`` (any dtype, same number of elements) receives the new weights.
    ``step`` is 1-based (bias correction). torch.optim.AdamW's maths exactly.
    """
    if step < 1:
        raise ValueError(f"step must be >= 1 (1-based, for bias correction), got {step}")
    tensors = {"param": param, "grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    if lowp_out is not None:
        tensors["lowp_out"] = lowp_out
    n = param.numel()
    for name, t in tensors.items():
        if t.device.type != "cpu":
            raise ValueError(f"cpu_adam_step: {name} is on {t.device}; the CPU step takes host tensors")
        if t.numel() != n:
            raise ValueError(f"cpu_adam_step: {name} has {t.numel()} elements, param has {n}")
        if not t.is_contiguous():
            raise ValueError(f"cpu_adam_step: {name} must be contiguous")
    for name in ("param", "exp_avg", "exp_avg_sq"):
        if tensors[name].dtype != torch.float32:
            raise ValueError(f"cpu_adam_step: {name} must be fp32, got {tensors[name].dtype}")
    fused = torch._fused_adamw_ if decoupled else torch._fused_adam_
    kwargs: dict[str, Any] = {
        "lr": lr, "beta1": beta1, "beta2": beta2, "weight_decay": weight_decay, "eps": eps, "amsgrad": False,
        "maximize": False, "found_inf": None,
        # torch's kernel divides the gradient by its grad_scale: hand it the reciprocal of ours
        "grad_scale": None if grad_scale == 1.0 else torch.tensor(1.0 / grad_scale),
    }
    steps = [torch.tensor(float(step))]
    p, g, m, v = (t.view(-1) for t in (param, grad, exp_avg, exp_avg_sq))
    out = lowp_out.view(-1) if lowp_out is not None else None
    if out is None and g.dtype == torch.float32:  # nothing to do around the kernel: one call
        fused([p], [g], [m], [v], [], steps, **kwargs)
        return
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        g32 = g[s:e] if g.dtype == torch.float32 else g[s:e].float()
        fused([p[s:e]], [g32], [m[s:e]], [v[s:e]], [], steps, **kwargs)
        if out is not None:
            out[s:e].copy_(p[s:e])


@dataclass(frozen=True)
class CPUAdam:
    """AdamW (``adamw_mode=True``, torch.optim.AdamW) or Adam with L2 decay, stepped on the CPU.

    DeepSpeed's ``DeepSpeedCPUAdam`` in role; no compiled extension. Pass it as the
    rule of a ZeRO optimizer whose store keeps state in host memory or on NVMe.
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    adamw_mode: bool = True
    state_names: tuple[str, ...] = field(default=("exp_avg", "exp_avg_sq"), init=False)

    @property
    def name(self) -> str:
        return "AdamW" if self.adamw_mode else "Adam"

    @property
    def defaults(self) -> dict[str, Any]:
        return {"lr": self.lr, "betas": self.betas, "eps": self.eps, "weight_decay": self.weight_decay}

    def update(self, master: torch.Tensor, grad: torch.Tensor, state: Mapping[str, torch.Tensor], *, step: int,
               hparams: Mapping[str, Any], grad_scale: float, lowp_out: torch.Tensor | None) -> None:
        b1, b2 = hparams["betas"]
        if not math.isfinite(grad_scale) or grad_scale <= 0:
            raise ValueError(f"grad_scale must be a finite positive number, got {grad_scale}")
        cpu_adam_step(master, grad, state["exp_avg"], state["exp_avg_sq"], step=step, lr=hparams["lr"],
                      beta1=b1, beta2=b2, eps=hparams["eps"], weight_decay=hparams["weight_decay"],
                      decoupled=self.adamw_mode, grad_scale=grad_scale, lowp_out=lowp_out)
