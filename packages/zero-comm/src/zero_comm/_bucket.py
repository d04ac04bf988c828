"""Bucketing: many small tensors as a few flat, size-bounded buffers.

One collective over a 25 MB bucket is far cheaper than a thousand over its
pieces. A :class:`FlatBucket` owns one flat buffer and knows where each member
tensor lives in it, so the buffer can be filled from the members, read back into
them, or used directly through views shaped like the members.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from ._communicator import Communicator, Handle, ReduceOp

__all__ = ["FlatBucket", "all_reduce_coalesced", "broadcast_coalesced", "make_buckets"]

DEFAULT_BUCKET_BYTES = 25 * 2**20


@dataclass
class FlatBucket:
    """A flat buffer holding a run of same-dtype, same-device tensors end to end.

    ``offsets[i]`` is where member ``i`` starts; each member starts on a multiple
    of ``align`` elements (alignment lets kernels and shards start on clean
    boundaries). ``flat`` may be longer than the members need (alignment padding).
    """

    flat: torch.Tensor
    members: list[torch.Tensor]
    offsets: list[int] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()

    def views(self) -> list[torch.Tensor]:
        """Tensors shaped like the members that share the bucket's storage."""
        return [self.flat[o:o + t.numel()].view(t.shape) for t, o in zip(self.members, self.offsets, strict=True)]

    def fill(self) -> FlatBucket:
        """Copy every member into the flat buffer."""
        for view, member in zip(self.views(), self.members, strict=True):
            view.copy_(member)
        return self

    def scatter_back(self) -> None:
        """Copy the flat buffer's contents back into the members."""
        for view, member in zip(self.views(), self.members, strict=True):
            member.copy_(view)


def _round_up(n: int, align: int) -> int:
    return -(-n // align) * align


def make_buckets(tensors: Iterable[torch.Tensor], max_bytes: int = DEFAULT_BUCKET_BYTES, *,
                 align: int = 1, fill: bool = True) -> list[FlatBucket]:
    """Pack ``tensors`` in order into flat buckets of at most ``max_bytes`` each.

    Tensors of different dtypes or devices go to different buckets; a tensor larger
    than ``max_bytes`` gets a bucket of its own. With ``fill`` the buffers start as
    copies of the members, otherwise uninitialised.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    open_runs: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    open_bytes: dict[tuple[torch.dtype, torch.device], int] = {}
    runs: list[list[torch.Tensor]] = []
    for t in tensors:
        key = (t.dtype, t.device)
        size = _round_up(t.numel(), align) * t.element_size()
        run = open_runs.get(key)
        if run is None or open_bytes[key] + size > max_bytes:
            run = []
            runs.append(run)
            open_runs[key], open_bytes[key] = run, 0
        run.append(t)
        open_bytes[key] += size
    buckets = []
    for run in runs:
        offsets, total = [], 0
        for t in run:
            offsets.append(total)
            total += _round_up(t.numel(), align)
        flat = torch.zeros(total, dtype=run[0].dtype, device=run[0].device)
        bucket = FlatBucket(flat, run, offsets)
        buckets.append(bucket.fill() if fill else bucket)
    return buckets


def all_reduce_coalesced(comm: Communicator, tensors: Sequence[torch.Tensor], op: ReduceOp = "sum", *,
                         bucket_bytes: int = DEFAULT_BUCKET_BYTES, async_op: bool = False) -> Handle[None] | None:
    """All-reduce many tensors in place through a few bucketed collectives.

    Every bucket's all_reduce is in flight at once; results are copied back into
    ``tensors`` when the returned handle is waited on (at once unless ``async_op``).
    """
    buckets = make_buckets(tensors, bucket_bytes)
    handles = [comm.all_reduce(b.flat, op, async_op=True) for b in buckets]
    return _finish_all(handles, buckets, async_op)


def broadcast_coalesced(comm: Communicator, tensors: Sequence[torch.Tensor], src: int, *,
                        bucket_bytes: int = DEFAULT_BUCKET_BYTES, async_op: bool = False) -> Handle[None] | None:
    """Broadcast many tensors from group rank ``src`` in place, bucketed (e.g. initial weights)."""
    buckets = make_buckets(tensors, bucket_bytes)
    handles = [comm.broadcast(b.flat, src, async_op=True) for b in buckets]
    return _finish_all(handles, buckets, async_op)


def _finish_all(handles: list[Handle], buckets: list[FlatBucket], async_op: bool) -> Handle[None] | None:
    def finish() -> None:
        for b in buckets:
            b.scatter_back()

    combined: Handle[None] = Handle(handles, finish, lambda: f"{len(buckets)} coalesced buckets")
    return combined if async_op else combined.wait()
