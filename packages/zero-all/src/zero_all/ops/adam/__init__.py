"""``deepspeed.ops.adam``: ``FusedAdam`` (zero-kernels' fused step, any device) and ``DeepSpeedCPUAdam``
(zero-offload's CPU step), as standalone ``torch.optim.Optimizer``s."""

from ._adam import DeepSpeedCPUAdam, FusedAdam

__all__ = ["DeepSpeedCPUAdam", "FusedAdam"]
