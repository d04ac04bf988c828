"""The four communication steps of tensor parallelism, each an autograd function (Megatron-LM's mappings).

A column-parallel linear needs its input whole on every rank and its input's
gradient summed over ranks (``copy_to_tp``); a row-parallel linear sums its partial
outputs (``reduce_from_tp``), whose gradient is already whole. ``gather_from_tp``
and ``scatter_to_tp`` move between a last dimension split over ranks and the whole.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from zero_comm import Communicator

__all__ = ["copy_to_tp", "gather_from_tp", "reduce_from_tp", "scatter_to_tp"]


def _all_reduce(x: torch.Tensor, comm: Communicator) -> torch.Tensor:
    out = x.contiguous().clone()
    comm.all_reduce(out)
    return out


def _gather_last(x: torch.Tensor, comm: Communicator) -> torch.Tensor:
    n = comm.world_size
    full = comm.all_gather(x.contiguous().reshape(-1))
    return full.reshape(n, *x.shape).movedim(0, -2).reshape(*x.shape[:-1], n * x.shape[-1])


def _split_last(x: torch.Tensor, comm: Communicator) -> torch.Tensor:
    n = comm.world_size
    if x.shape[-1] % n:
        raise ValueError(f"cannot split a last dimension of {x.shape[-1]} over {n} tensor-parallel ranks")
    return x.chunk(n, dim=-1)[comm.rank].contiguous()


def _identity(x: torch.Tensor, comm: Communicator) -> torch.Tensor:
    return x.view_as(x)


Step = Callable[[torch.Tensor, Communicator], torch.Tensor]


class _Mapping(torch.autograd.Function):
    """``forward`` one way, ``backward`` the other: the four mappings differ only in the pair."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, comm: Communicator, fwd: Step, bwd: Step) -> torch.Tensor:
        ctx.comm, ctx.bwd = comm, bwd
        return fwd(x, comm)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return ctx.bwd(grad, ctx.comm), None, None, None


def copy_to_tp(x: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """Identity forward; backward sums the gradient over the tensor-parallel group."""
    return _Mapping.apply(x, comm, _identity, _all_reduce)


def reduce_from_tp(x: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """Sum over the tensor-parallel group forward; identity backward."""
    return _Mapping.apply(x, comm, _all_reduce, _identity)


def gather_from_tp(x: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """Concatenate the ranks' last-dimension slices forward; take this rank's slice backward."""
    return _Mapping.apply(x, comm, _gather_last, _split_last)


def scatter_to_tp(x: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """Take this rank's last-dimension slice forward; concatenate the slices backward."""
    return _Mapping.apply(x, comm, _split_last, _gather_last)
