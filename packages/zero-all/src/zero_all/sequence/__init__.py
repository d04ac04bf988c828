"""``deepspeed.sequence``: Ulysses sequence parallelism (:class:`layer.DistributedAttention`)."""

from . import layer
from .layer import DistributedAttention

__all__ = ["DistributedAttention", "layer"]
