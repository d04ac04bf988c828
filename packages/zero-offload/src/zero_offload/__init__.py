"""zero-offload: where model states go when the device is full.

:class:`HostStore` keeps named flat tensors in (pinned) host memory;
:class:`NVMeStore` keeps them in files, streamed through a bounded pool of aligned
host buffers by a prefetching swapper; :class:`LayerStreamer` keeps an inference model's
layers in a store and brings each onto the device just before it runs. The stores satisfy
zero-optim's ``StateStore`` protocol, with no import either way. The CPU Adam step is
zero-kernels' ``adam_step`` (zero-optim's ``AdamW``/``Adam`` rules over host shards).
"""

from ._host import HostStore
from ._io import ALIGN, SwapIOError, aligned_empty
from ._nvme import NVMeStore, StoreHandle, sweep_orphans
from ._stream import LayerStreamer
from ._swapper import SwapStats

__version__ = "0.2.0"

__all__ = ["ALIGN", "HostStore", "LayerStreamer", "NVMeStore", "StoreHandle", "SwapIOError", "SwapStats",
           "aligned_empty", "sweep_orphans"]
