"""The loop DeepSpeed's op optimizers share: each parameter stepped as one flat tensor by a fused kernel.

A parameter that is not fp32 (bf16, fp16) keeps an fp32 master copy in its state, and the kernel writes the
new weights back into the parameter in its own dtype (``lowp_out``), as a mixed-precision optimizer does.
The state tensors (``state_names``, fp32, the parameter's size) are made on the first step; ``step`` counts
steps per parameter (1-based, for bias correction).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["FlatStepOptimizer"]


class FlatStepOptimizer(torch.optim.Optimizer):
    state_names: tuple[str, ...] = ()

    def _kernel(self, param: torch.Tensor, grad: torch.Tensor, state: list[torch.Tensor], *, step: int,
                group: dict[str, Any], lowp_out: torch.Tensor | None) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step over every parameter that has a gradient; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not take sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    master = p.detach().float() if p.dtype != torch.float32 else None
                    if master is not None:
                        state["master"] = master.contiguous()
                    like = master if master is not None else p
                    for name in self.state_names:
                        state[name] = torch.zeros_like(like, memory_format=torch.contiguous_format)
                state["step"] += 1
                master = state.get("master")
                weight = master if master is not None else p
                if not weight.is_contiguous():
                    raise ValueError(f"{type(self).__name__} steps contiguous parameters; got strides "
                                     f"{tuple(p.stride())} for shape {tuple(p.shape)}")
                self._kernel(weight.view(-1), p.grad.contiguous().view(-1),
                             [state[name].view(-1) for name in self.state_names], step=state["step"], group=group,
                             lowp_out=p.view(-1) if master is not None else None)
        return loss
