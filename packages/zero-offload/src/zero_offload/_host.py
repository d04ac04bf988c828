"""HostStore: named flat tensors in host memory, page-locked when there is a GPU to copy to.

ZeRO-Offload's tier: the fp32 master weights and optimizer state leave the device
and the optimizer step runs on the CPU over them. Pinned (page-locked) memory lets
the copies between device and host run asynchronously, on a side stream; without
CUDA there is nothing to pin for. It satisfies zero-optim's ``StateStore``
protocol structurally; ``get`` hands out the tensor itself.
"""

from __future__ import annotations

import torch

from ._swapper import check_put

__all__ = ["HostStore"]


class HostStore:
    """State in host memory. ``pin``: page-lock it (default: when CUDA is available)."""

    def __init__(self, *, pin: bool | None = None):
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.device = torch.device("cpu")
        self._tensors: dict[str, torch.Tensor] = {}

    def reserve(self, nbytes: int) -> None:
        """Host memory is checked by the allocator when ``create`` copies each tensor in."""

    def create(self, key: str, value: torch.Tensor) -> None:
        if key in self._tensors:
            raise KeyError(f"state {key!r} already exists")
        host = torch.empty(value.shape, dtype=value.dtype, pin_memory=self.pin)
        host.copy_(value.detach())
        self._tensors[key] = host

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._tensors[key]
        except KeyError:
            raise KeyError(f"no state named {key!r} in the store") from None

    def put(self, key: str, value: torch.Tensor) -> None:
        mine = self.get(key)
        check_put(key, value, mine.numel(), mine.dtype)
        if value.data_ptr() != mine.data_ptr():
            mine.copy_(value.reshape(mine.shape))

    def delete(self, key: str) -> None:
        """Drop ``key``: its memory is freed once no one else holds the tensor."""
        self.get(key)
        del self._tensors[key]

    def release(self, key: str) -> None:
        """Nothing to give back: the tensor stays in host memory."""

    def prefetch(self, keys: list[str]) -> None:
        """Nothing to read ahead: every tensor is already in host memory."""

    def flush(self) -> None:
        """Nothing to write: ``put`` copies in place."""

    def keys(self) -> list[str]:
        return list(self._tensors)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors.values())
