"""All-to-all as an autograd op: the exchange behind expert and sequence (Ulysses) parallelism.

``all_to_all(x, comm, scatter_dim, gather_dim)`` cuts ``x`` along ``scatter_dim`` into
one block per rank, sends block ``i`` to rank ``i``, and joins what arrives along
``gather_dim``, rank order. Its gradient is the opposite exchange (scatter along
``gather_dim``, gather along ``scatter_dim``), so a layer written with it trains
like the unsplit layer. Expert parallelism exchanges the expert dimension with
itself (``scatter_dim == gather_dim == 0``: a rank's tokens for expert block ``i`` go
to rank ``i``); Ulysses scatters attention heads and gathers the sequence.
"""

from __future__ import annotations

from typing import Any

import torch

from zero_comm import Communicator

__all__ = ["all_to_all"]


def _exchange(x: torch.Tensor, comm: Communicator, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    n = comm.world_size
    if n == 1:
        return x
    if x.shape[scatter_dim] % n:
        raise ValueError(
            f"all_to_all over {n} ranks: dimension {scatter_dim} of a tensor of shape "
            f"{tuple(x.shape)} does not divide into {n} equal blocks"
        )
    # [n, size / n, the other dimensions]: block i goes to rank i
    blocks = x.movedim(scatter_dim, 0)
    blocks = blocks.reshape(n, blocks.shape[0] // n, *blocks.shape[1:]).contiguous()
    received = comm.all_to_all(blocks)
    # back to x's dimension order with a leading source-rank dimension, which joins gather_dim
    received = received.movedim(1, scatter_dim + 1).movedim(0, gather_dim)
    shape = list(received.shape)
    shape[gather_dim : gather_dim + 2] = [shape[gather_dim] * shape[gather_dim + 1]]
    return received.reshape(shape)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, comm: Communicator, scatter_dim: int, gather_dim: int) -> torch.Tensor:
        ctx.comm, ctx.dims = comm, (scatter_dim, gather_dim)
        return _exchange(x, comm, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        scatter_dim, gather_dim = ctx.dims
        return _exchange(grad, ctx.comm, gather_dim, scatter_dim), None, None, None


def all_to_all(x: torch.Tensor, comm: Communicator, scatter_dim: int = 0, gather_dim: int = 0) -> torch.Tensor:
    """Scatter ``x`` along ``scatter_dim`` over ``comm``'s ranks and gather along ``gather_dim`` (differentiable)."""
    ndim = x.dim()
    if not (-ndim <= scatter_dim < ndim and -ndim <= gather_dim < ndim):
        raise ValueError(
            f"all_to_all: dimensions {scatter_dim} and {gather_dim} are outside a tensor of shape {tuple(x.shape)}"
        )
    return _AllToAll.apply(x, comm, scatter_dim % ndim, gather_dim % ndim)
