"""What a checkpoint holds: sharded states, the components that have one, and whole tensors as one.

A checkpoint's items map a name to a sharded state (names to tensors, each with its global
shape, dtype and the pieces this rank holds) or to a :class:`Checkpointable` component that
gives one. Both the writer (``_state``) and the loader (``_load``) read items through here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["Checkpointable", "FullTensor", "ShardedState", "ShardedTensorLike", "module_state", "tensors_state"]


@runtime_checkable
class ShardedTensorLike(Protocol):
    """One logical tensor as a rank holds it (zero-optim's ShardedTensor satisfies this)."""

    @property
    def global_shape(self) -> tuple[int, ...]: ...
    @property
    def dtype(self) -> torch.dtype: ...
    @property
    def pieces(self) -> Sequence[Any]: ...  # each with .start, .stop and .data (1-D, stop - start elements)


ShardedState = Mapping[str, ShardedTensorLike]


@runtime_checkable
class Checkpointable(Protocol):
    """A component whose state is a sharded state plus a few small values (a ZeRO optimizer)."""

    def sharded_state(self) -> ShardedState: ...
    def checkpoint_meta(self) -> dict[str, Any]: ...
    def load_checkpoint_meta(self, meta: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class _Piece:
    start: int
    stop: int
    data: torch.Tensor


@dataclass(frozen=True)
class FullTensor:
    """A whole tensor as a sharded state entry: one piece covering it (or none, where another rank
    writes it)."""

    global_shape: tuple[int, ...]
    dtype: torch.dtype
    pieces: list[_Piece]


def module_state(module: torch.nn.Module) -> dict[str, FullTensor]:
    """A module's ``state_dict`` as a sharded state of whole tensors (views: loading writes into the
    module). Replicated on every rank, it is written once (by the lowest rank) and read by every rank."""
    return tensors_state(module.state_dict(keep_vars=True))


def tensors_state(tensors: Mapping[str, torch.Tensor]) -> dict[str, FullTensor]:
    """Named whole tensors, replicated on every rank, as a sharded state (views: loading writes into
    them in place, so they must be contiguous)."""
    out = {}
    for name, value in tensors.items():
        t = value.detach()
        if not t.is_contiguous():
            raise ValueError(f"{name}: a checkpointed tensor must be contiguous (loading writes into it)")
        out[name] = FullTensor(tuple(t.shape), t.dtype, [_Piece(0, t.numel(), t.reshape(-1))])
    return out


def _items_state(items: Mapping[str, Any]) -> dict[str, ShardedTensorLike]:
    out = {}
    for item, obj in items.items():
        state = obj.sharded_state() if isinstance(obj, Checkpointable) else obj
        if not isinstance(state, Mapping):
            raise TypeError(f"checkpoint item {item!r} must be a sharded state (a mapping of names to tensors "
                            f"with global_shape, dtype and pieces) or have sharded_state(); got {type(obj)}")
        for name, entry in state.items():
            out[f"{item}/{name}"] = entry
    return out
