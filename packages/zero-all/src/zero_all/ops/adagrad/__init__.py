"""``deepspeed.ops.adagrad``: ``DeepSpeedCPUAdagrad``, torch's Adagrad under DeepSpeed's name and defaults.
Given to ``initialize`` as a client optimizer it is stepped per flat shard like any torch optimizer class."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["DeepSpeedCPUAdagrad"]


class DeepSpeedCPUAdagrad(torch.optim.Adagrad):
    def __init__(self, model_params: Iterable[Any], lr: float = 1e-2, eps: float = 1e-10, weight_decay: float = 0.0,
                 amsgrad: bool = False, fp32_optimizer_states: bool = True, **torch_options: Any):
        if amsgrad:
            raise NotImplementedError("DeepSpeedCPUAdagrad(amsgrad=True): Adagrad has no AMSGrad variant")
        del fp32_optimizer_states  # zero keeps optimizer state in fp32 always
        super().__init__(model_params, lr=lr, eps=eps, weight_decay=weight_decay, **torch_options)
