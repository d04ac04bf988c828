"""Quantised collectives (ZeRO++'s qwZ and qgZ): what travels is compressed, what is kept is not.

Both take a :class:`RowCodec`, which compresses each row of a 2-D tensor on its own
into values and scales (zero-kernels' blockwise int8 is the one zero uses; this
package cannot import it, so the caller hands it in). Every rank sends rows of the
same shape, so a receiver learns the sizes from its own encoding, and each row
travels as one byte string, values then scales: one collective per call.

* :func:`quantized_all_gather` -- each rank encodes its shard, one all-gather
  moves the bytes, every rank decodes every shard into the full tensor (its own
  too, so all ranks hold the same values).
* :func:`quantized_reduce_scatter` -- each rank encodes the chunk destined for each
  rank, one all-to-all delivers them, and each rank decodes the ``world_size``
  versions of its own chunk and sums them in fp32 (DeepSpeed's qgZ, with one
  all-to-all level instead of its intra- then inter-node pair).

The ledger books the collectives that actually ran, at the bytes they moved: an
``all_gather`` and an ``all_to_all`` of the compressed bytes. On one rank nothing
travels, and both run their exact counterparts.
"""

from __future__ import annotations

import math
from typing import Literal, Protocol, overload, runtime_checkable

import torch

from ._communicator import Communicator, Handle, ReduceOp

__all__ = ["RowCodec", "quantized_all_gather", "quantized_reduce_scatter"]


@runtime_checkable
class RowCodec(Protocol):
    """Compresses each row of a 2-D tensor on its own (no block spans two rows)."""

    def encode(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, scales)`` of ``rows`` (shape ``(r, c)``), each 2-D with ``r`` rows."""
        ...

    def decode(self, values: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> None:
        """Write the rows ``values`` and ``scales`` encode into ``out`` (shape ``(r, c)``, any float dtype)."""
        ...


def _pack(values: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, int]:
    """One uint8 row per encoded row: its values' bytes, then its scales' bytes."""
    rows = values.shape[0]
    v = values.contiguous().view(torch.uint8).view(rows, -1)
    s = scales.contiguous().view(torch.uint8).view(rows, -1)
    return torch.cat([v, s], dim=1), v.shape[1]


def _unpack(packed: torch.Tensor, split: int, values_like: torch.Tensor,
            scales_like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = packed.shape[0]
    values = packed[:, :split].contiguous().view(values_like.dtype).view(rows, -1)
    scales = packed[:, split:].contiguous().view(scales_like.dtype).view(rows, -1)
    return values, scales


def _describe(kind: str, comm: Communicator) -> str:
    return f"quantized {kind} on group '{comm.name}' (rank {comm.rank} of {comm.world_size})"


@overload
def quantized_all_gather(comm: Communicator, shard: torch.Tensor, codec: RowCodec, *,
                         out: torch.Tensor | None = ..., async_op: Literal[False] = ...) -> torch.Tensor: ...
@overload
def quantized_all_gather(comm: Communicator, shard: torch.Tensor, codec: RowCodec, *,
                         out: torch.Tensor | None = ..., async_op: Literal[True]) -> Handle[torch.Tensor]: ...
def quantized_all_gather(comm: Communicator, shard: torch.Tensor, codec: RowCodec, *,
                         out: torch.Tensor | None = None,
                         async_op: bool = False) -> Handle[torch.Tensor] | torch.Tensor:
    """Gather every rank's ``shard`` (same size on every rank) into ``out``, compressed on the way.

    ``out`` (default: a new tensor of ``shard``'s dtype) holds ``world_size * shard.numel()``
    elements; rank ``r``'s shard lands at ``[r * shard.numel(), (r + 1) * shard.numel())``.
    """
    n, chunk = comm.world_size, shard.numel()
    full = shard.new_empty(n * chunk) if out is None else out
    if full.numel() != n * chunk or not full.is_contiguous():
        raise ValueError(f"quantized all_gather: out must be a contiguous tensor of {n} x {chunk} elements, "
                         f"got {full.numel()}")
    if n == 1:
        full.view(-1).copy_(shard.reshape(-1))
        return Handle([], lambda: full, lambda: _describe("all_gather", comm)) if async_op else full
    values, scales = codec.encode(shard.reshape(1, chunk))
    packed, split = _pack(values, scales)
    gathered = packed.new_empty(n, packed.shape[1])
    handle = comm.all_gather(packed.view(-1), out=gathered.view(-1), async_op=True)

    def finish() -> torch.Tensor:
        codec.decode(*_unpack(gathered, split, values, scales), full.view(n, chunk))
        return full

    result: Handle[torch.Tensor] = Handle([handle], finish, lambda: _describe("all_gather", comm))
    return result if async_op else result.wait()


@overload
def quantized_reduce_scatter(comm: Communicator, flat: torch.Tensor, codec: RowCodec, op: ReduceOp = ..., *,
                             out: torch.Tensor | None = ..., async_op: Literal[False] = ...) -> torch.Tensor: ...
@overload
def quantized_reduce_scatter(comm: Communicator, flat: torch.Tensor, codec: RowCodec, op: ReduceOp = ..., *,
                             out: torch.Tensor | None = ..., async_op: Literal[True]) -> Handle[torch.Tensor]: ...
def quantized_reduce_scatter(comm: Communicator, flat: torch.Tensor, codec: RowCodec, op: ReduceOp = "sum", *,
                             out: torch.Tensor | None = None,
                             async_op: bool = False) -> Handle[torch.Tensor] | torch.Tensor:
    """Reduce ``flat`` over the group and return this rank's chunk (``"sum"`` or ``"avg"``), compressed on the way.

    ``flat`` is cut into ``world_size`` chunks of ``ceil(numel / world_size)`` elements (the last
    zero-padded), as :meth:`Communicator.reduce_scatter` cuts it; ``out``, if given, holds one chunk.
    The ``world_size`` received versions of this rank's chunk are summed in fp32, then rounded to
    ``out``'s dtype (default ``flat``'s).
    """
    if op not in ("sum", "avg"):
        raise ValueError(f"quantized reduce_scatter sums what it receives: op must be 'sum' or 'avg', got {op!r}")
    n, numel = comm.world_size, flat.numel()
    chunk = math.ceil(numel / n) if numel else 0
    shard = flat.new_empty(chunk) if out is None else out
    if shard.numel() != chunk or not shard.is_contiguous():
        raise ValueError(f"quantized reduce_scatter: out must be a contiguous tensor of {chunk} elements, "
                         f"got {shard.numel()}")
    if n == 1:
        return comm.reduce_scatter(flat, op, out=shard, async_op=async_op)
    rows = flat.reshape(-1)
    if numel != chunk * n:
        rows = torch.cat([rows, rows.new_zeros(chunk * n - numel)])
    values, scales = codec.encode(rows.view(n, chunk))
    packed, split = _pack(values, scales)
    received = torch.empty_like(packed)
    handle = comm.all_to_all(packed, out=received, async_op=True)

    def finish() -> torch.Tensor:
        versions = torch.empty(n, chunk, dtype=torch.float32, device=flat.device)
        codec.decode(*_unpack(received, split, values, scales), versions)
        total = versions.sum(dim=0)
        if op == "avg":
            total.div_(n)
        shard.view(-1).copy_(total)
        return shard

    result: Handle[torch.Tensor] = Handle([handle], finish, lambda: _describe("reduce_scatter", comm))
    return result if async_op else result.wait()
