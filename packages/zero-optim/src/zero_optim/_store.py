"""Where a shard's fp32 master weights and optimizer state live.

zero-optim declares the protocol; zero-offload provides host-memory and NVMe
stores that satisfy it structurally (no import either way). The default keeps
everything in device memory.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

__all__ = ["DeviceStore", "StateStore"]


@runtime_checkable
class StateStore(Protocol):
    """Named flat tensors: ``create`` once, ``get`` before use, ``put`` after an update."""

    def create(self, key: str, value: torch.Tensor) -> None: ...
    def get(self, key: str) -> torch.Tensor: ...
    def put(self, key: str, value: torch.Tensor) -> None: ...
    def keys(self) -> list[str]: ...


class DeviceStore:
    """State kept where it is computed on: ``get`` returns the tensor itself, ``put`` is free."""

    def __init__(self) -> None:
        self._tensors: dict[str, torch.Tensor] = {}

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
            self._tensors[key].copy_(value)

    def keys(self) -> list[str]:
        return list(self._tensors)
