"""``deepspeed.runtime.zero``: ``Init`` and ``GatheredParameters`` by their DeepSpeed home (the same objects
as ``deepspeed.zero``'s), and ``partition_parameters``."""

from ...zero import GatheredParameters, Init
from . import partition_parameters

__all__ = ["GatheredParameters", "Init", "partition_parameters"]
