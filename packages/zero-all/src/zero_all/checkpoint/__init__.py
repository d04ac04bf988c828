"""``deepspeed.checkpoint``: ``utils.clone_tensors_for_torch_save`` (what Accelerate saves a state dict through)."""

from . import utils

__all__ = ["utils"]
