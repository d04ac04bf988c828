"""zero-offload: where model states go when the device is full.

:class:`HostStore` keeps named flat tensors in (pinned) host memory;
:class:`NVMeStore` keeps them in files, streamed through a bounded pool of aligned
host buffers by a prefetching swapper; :class:`CPUAdam` steps Adam/AdamW over host
shards; :class:`LayerStreamer` keeps an inference model's layers in a store and brings
each onto the device just before it runs. The stores satisfy zero-optim's ``StateStore`` protocol and ``CPUAdam`` its
``UpdateRule`` protocol, with no import either way.
"""

from ._cpu_adam import CPUAdam, cpu_adam_step
from ._host import HostStore
from ._io import ALIGN, SwapIOError, aligned_empty
from ._nvme import NVMeStore, StoreHandle, sweep_orphans
from ._stream import LayerStreamer
from ._swapper import SwapStats

__version__ = "0.1.0"

__all__ = ["ALIGN", "CPUAdam", "HostStore", "LayerStreamer", "NVMeStore", "StoreHandle", "SwapIOError", "SwapStats",
           "aligned_empty", "cpu_adam_step", "sweep_orphans"]
