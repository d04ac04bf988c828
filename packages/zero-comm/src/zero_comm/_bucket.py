"""Bucketing: many small tensors as a few flat, size-bounded buffers.

One collective over a 25 MB bucket is far cheaper than a thousand over its
pieces. :func:`pack_runs` is the packing itself, on sizes alone: consecutive runs,
each bounded, each member's offset in its run (zero-optim's flat layout packs its
parameters with it too). A :class:`FlatBucket` owns one flat buffer and knows where
each member tensor lives in it, so the buffer can be filled from the members, read
back into them, or used directly through views shaped like the members.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from ._communicator import Communicator, Handle, ReduceOp

__all__ = ["FlatBucket", "PackedRun", "all_reduce_coalesced", "broadcast_coalesced", "make_buckets", "pack_runs"]

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


@dataclass(frozen=True)
class PackedRun:
    """Members ``start`` to ``stop`` (exclusive) of a sequence of sizes, end to end in one buffer.

    ``offsets[i]`` is where member ``start + i`` begins, relative to the run; ``numel``
    is the run's length, each member rounded up to the alignment.
    """

    start: int
    offsets: tuple[int, ...]
    numel: int

    @property
    def stop(self) -> int:
        return self.start + len(self.offsets)


def pack_runs(sizes: Iterable[int], limit: int, *, align: int = 1) -> list[PackedRun]:
    """Split ``sizes``, in order, into consecutive runs of at most ``limit`` (in the sizes' unit).

    Each member takes its size rounded up to a multiple of ``align`` (so every member
    starts on an aligned offset); a run is closed when the next member would take it
    past ``limit``, so a member larger than ``limit`` is a run of its own. Every
    member is in exactly one run, and the runs cover the sequence in order: a layout
    that depends only on the sizes, the same on every rank.
    """
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    runs: list[PackedRun] = []
    offsets: list[int] | None = None
    start = used = 0
    for i, size in enumerate(sizes):
        if size < 0:
            raise ValueError(f"size {i} is negative ({size})")
        padded = _round_up(size, align)
        if offsets is None or used + padded > limit:
            if offsets is not None:
                runs.append(PackedRun(start, tuple(offsets), used))
            start, offsets, used = i, [], 0
        offsets.append(used)
        used += padded
    if offsets is not None:
        runs.append(PackedRun(start, tuple(offsets), used))
    return runs


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
    members = list(tensors)
    by_kind: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(members):
        by_kind.setdefault((t.dtype, t.device), []).append(i)
    made: list[tuple[int, FlatBucket]] = []  # (position of the first member, bucket): buckets in member order
    for indices in by_kind.values():
        kind = members[indices[0]]
        # a run of whole elements fits max_bytes exactly when it fits max_bytes // element_size elements
        for run in pack_runs([members[i].numel() for i in indices], max_bytes // kind.element_size(), align=align):
            flat = torch.zeros(run.numel, dtype=kind.dtype, device=kind.device)
            bucket = FlatBucket(flat, [members[i] for i in indices[run.start:run.stop]], list(run.offsets))
            made.append((indices[run.start], bucket.fill() if fill else bucket))
    return [bucket for _, bucket in sorted(made, key=lambda m: m[0])]


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
