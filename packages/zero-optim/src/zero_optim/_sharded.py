"""The ShardedState view: which slice of which tensor this rank holds, for checkpoints.

zero-ckpt declares the protocol it reads; zero-optim provides this view. Each
entry names one logical tensor (``"<state>/<parameter name>"``, state being
``master`` or one of the rule's state names), gives its global shape and dtype,
and lists the pieces this rank holds as ranges of the tensor's flattened
index space. A parameter can be split across ranks at any element, so a rank
may hold part of a tensor, all of it, or none (then it has no entry).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ShardPiece", "ShardedTensor"]


@dataclass(frozen=True)
class ShardPiece:
    start: int  # first element, in the flattened global tensor
    stop: int  # one past the last
    data: torch.Tensor  # 1-D view of this rank's copy of those elements


@dataclass(frozen=True)
class ShardedTensor:
    global_shape: tuple[int, ...]
    dtype: torch.dtype
    pieces: list[ShardPiece]

    @property
    def numel(self) -> int:
        return sum(p.stop - p.start for p in self.pieces)
