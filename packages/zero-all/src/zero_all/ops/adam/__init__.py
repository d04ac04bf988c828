"""``deepspeed.ops.adam``: ``FusedAdam`` (zero-kernels' fused step, any device) and ``DeepSpeedCPUAdam``
(the same step on host parameters), as standalone ``torch.optim.Optimizer``s."""

from ._adam import DeepSpeedCPUAdam, FusedAdam

__all__ = ["DeepSpeedCPUAdam", "FusedAdam"]
