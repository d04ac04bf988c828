"""Where a shard's fp32 master weights and optimizer state live.

zero-optim declares the protocol; zero-offload provides host-memory and NVMe
stores that satisfy it structurally (no import either way). The default keeps
everything in device memory.

A store's ``device`` says where its tensors are, and so where the optimizer step
runs: when it differs from the gradients' device (optimizer offload), the
gradient shard is copied to it, the step runs there, and the new low-precision
weights are copied back. A store that is slower than memory learns the order of
use from ``prefetch`` and is told what changed: ``put`` after an update,
``release`` after a read.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

__all__ = ["DeviceStore", "StateStore"]


@runtime_checkable
class StateStore(Protocol):
    """Named flat tensors: ``create`` once; ``get`` borrows, ``put`` (changed) or ``release`` (read) returns."""

    device: torch.device | None  # where get() returns tensors; None: where they were created

    def reserve(self, nbytes: int) -> None: ...  # about to create this many bytes: raise now if they cannot fit
    def create(self, key: str, value: torch.Tensor) -> None: ...
    def get(self, key: str) -> torch.Tensor: ...
    def put(self, key: str, value: torch.Tensor) -> None: ...
    def release(self, key: str) -> None: ...
    def prefetch(self, keys: list[str]) -> None: ...  # the order the next gets will come in
    def flush(self) -> None: ...  # finish every put (raising its error)
    def keys(self) -> list[str]: ...


class DeviceStore:
    """State kept where it is computed on: ``get`` returns the tensor itself, ``put`` is free."""

    device: torch.device | None = None

    def __init__(self) -> None:
        self._tensors: dict[str, torch.Tensor] = {}

    def reserve(self, nbytes: int) -> None:
        """Device memory is checked by its allocator, tensor by tensor."""

    def create(self, key: str, value: torch.Tensor) -> None:
        if key in self._tensors:
            raise KeyError(f"state {key!r} already exists")
        self._tensors[key] = value

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._tensors[key]
        except KeyError:
            raise KeyError(f"no state named {key!r}") from None

    def put(self, key: str, value: torch.Tensor) -> None:
        if value is not self._tensors.get(key):
            self.get(key).copy_(value)

    def release(self, key: str) -> None:
        """Nothing to give back: the tensor stays where it is."""

    def prefetch(self, keys: list[str]) -> None:
        """Nothing to read ahead."""

    def flush(self) -> None:
        """Nothing in flight."""

    def keys(self) -> list[str]:
        return list(self._tensors)
