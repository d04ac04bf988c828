"""``deepspeed.accelerator``: ``get_accelerator()``, the device this process trains on, in DeepSpeed's words.

A script asks it for its device (``device_name(local_rank)``), seeds, syncs and reads memory
through it instead of ``torch.cuda``, so the same script runs on a GPU and on a CPU. Here it
is CUDA where torch sees a GPU and the CPU otherwise (DeepSpeed's other accelerators --
XPU, NPU, HPU, MPS -- are not mapped). On the CPU the calls that have no meaning there
(``synchronize``, ``empty_cache``, ``set_device``, ``pin_memory``) do nothing, as in
DeepSpeed's CPU accelerator, and memory is the process's resident set.
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
from typing import Any

import torch

__all__ = ["Accelerator", "get_accelerator"]


class Accelerator:
    """One accelerator kind: ``"cuda"`` (collectives over NCCL) or ``"cpu"`` (Gloo)."""

    def __init__(self, name: str):
        if name not in ("cuda", "cpu"):
            raise ValueError(f"accelerator {name!r}: zero runs on 'cuda' or 'cpu'")
        self._name = name
        self._cuda = name == "cuda"
        self._peak_rss = 0

    def __repr__(self) -> str:
        return f"Accelerator({self._name!r})"

    # -- devices -----------------------------------------------------------------------------
    def device_name(self, device_index: int | None = None) -> str:
        """``"cuda"``/``"cuda:<i>"`` or ``"cpu"`` (the CPU has no index)."""
        if not self._cuda or device_index is None:
            return self._name
        return f"cuda:{device_index}"

    def device(self, device_index: int | None = None) -> torch.device:
        if not self._cuda:
            return torch.device("cpu")
        return torch.device("cuda") if device_index is None else torch.device("cuda", device_index)

    def current_device(self) -> int:
        """The CUDA device index in use; on the CPU, this process's rank on its node (as DeepSpeed)."""
        return torch.cuda.current_device() if self._cuda else int(os.environ.get("LOCAL_RANK", "0"))

    def current_device_name(self) -> str:
        return f"cuda:{torch.cuda.current_device()}" if self._cuda else "cpu"

    def device_count(self) -> int:
        """GPUs torch sees; on the CPU, the processes on this node (one CPU "device" each)."""
        return torch.cuda.device_count() if self._cuda else int(os.environ.get("LOCAL_WORLD_SIZE", "1"))

    def set_device(self, device_index: int) -> None:
        if self._cuda:
            torch.cuda.set_device(device_index)

    def is_available(self) -> bool:
        return torch.cuda.is_available() if self._cuda else True

    def is_synchronized_device(self) -> bool:
        """Whether work finishes when the call returns (the CPU) rather than on a stream (CUDA)."""
        return not self._cuda

    def communication_backend_name(self) -> str:
        return "nccl" if self._cuda else "gloo"

    def synchronize(self, device_index: int | None = None) -> None:
        if self._cuda:
            torch.cuda.synchronize(device_index)

    # -- random numbers --------------------------------------------------------------------------
    def random(self) -> Any:
        return torch.random

    def manual_seed(self, seed: int) -> Any:
        return torch.cuda.manual_seed(seed) if self._cuda else torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> Any:
        return torch.cuda.manual_seed_all(seed) if self._cuda else torch.manual_seed(seed)

    def initial_seed(self) -> int:
        return torch.cuda.initial_seed() if self._cuda else torch.initial_seed()

    def get_rng_state(self, device_index: int | None = None) -> torch.Tensor:
        if self._cuda:
            return torch.cuda.get_rng_state("cuda" if device_index is None else device_index)
        return torch.get_rng_state()

    def set_rng_state(self, new_state: torch.Tensor, device_index: int | None = None) -> None:
        if self._cuda:
            torch.cuda.set_rng_state(new_state, "cuda" if device_index is None else device_index)
        else:
            torch.set_rng_state(new_state)

    # -- streams and events (CUDA only: None on the CPU, as in DeepSpeed) -------------------------------
    @property
    def Stream(self) -> Any:
        return torch.cuda.Stream if self._cuda else None

    @property
    def Event(self) -> Any:
        return torch.cuda.Event if self._cuda else None

    def stream(self, stream: Any) -> contextlib.AbstractContextManager[Any]:
        return torch.cuda.stream(stream) if self._cuda else contextlib.nullcontext()

    def current_stream(self, device_index: int | None = None) -> Any:
        return torch.cuda.current_stream(device_index) if self._cuda else None

    # -- memory ----------------------------------------------------------------------------------
    def empty_cache(self) -> None:
        if self._cuda:
            torch.cuda.empty_cache()

    def memory_allocated(self, device_index: int | None = None) -> int:
        """Bytes held by tensors on the device; on the CPU, the process's resident set."""
        return torch.cuda.memory_allocated(device_index) if self._cuda else self._rss()

    def max_memory_allocated(self, device_index: int | None = None) -> int:
        """The peak of ``memory_allocated`` (on the CPU, since the last ``reset_peak_memory_stats``)."""
        if self._cuda:
            return torch.cuda.max_memory_allocated(device_index)
        return max(self._peak_rss, self._rss())

    def memory_reserved(self, device_index: int | None = None) -> int:
        return torch.cuda.memory_reserved(device_index) if self._cuda else self._rss()

    def reset_peak_memory_stats(self, device_index: int | None = None) -> None:
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(device_index)
        self._peak_rss = 0

    def total_memory(self, device_index: int | None = None) -> int:
        if self._cuda:
            return torch.cuda.get_device_properties(device_index or 0).total_memory
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: the peak is what the OS reports
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self._peak_rss = max(self._peak_rss, rss)
        return rss

    def pin_memory(self, tensor: torch.Tensor, align_bytes: int = 1) -> torch.Tensor:
        """``tensor`` in page-locked host memory, for fast copies to the GPU (unchanged on the CPU)."""
        return tensor.pin_memory() if self._cuda else tensor

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        return tensor.is_pinned() if self._cuda else False

    def on_accelerator(self, tensor: torch.Tensor) -> bool:
        return tensor.device.type == self._name

    # -- data types --------------------------------------------------------------------------------
    def is_bf16_supported(self) -> bool:
        return torch.cuda.is_bf16_supported() if self._cuda else True

    def is_fp16_supported(self) -> bool:
        return True

    def supported_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.float16] + ([torch.bfloat16] if self.is_bf16_supported() else [])


@functools.cache
def get_accelerator() -> Accelerator:
    """The accelerator of this process: CUDA when torch sees a GPU, else the CPU."""
    return Accelerator("cuda" if torch.cuda.is_available() else "cpu")
