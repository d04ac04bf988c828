"""Flat layout: a parameter group's tensors as buckets in one flat buffer, each split over ranks.

Parameters are packed, whole and in reverse registration order (the order their
gradients usually become ready in backward), into buckets of at most
``bucket_numel`` elements (a larger parameter alone), by zero-comm's ``pack_runs``.
Each bucket is padded to a multiple of ``world_size * align`` and split into
``world_size`` equal chunks; rank ``r`` owns chunk ``r`` of every bucket. A rank's
shard of the group is its chunks, end to end. So every bucket is reduce-scattered and all-gathered by one
collective that divides evenly, and every rank's shard is the same size:
balanced to ``align`` elements.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from zero_comm import pack_runs

__all__ = ["Bucket", "GroupLayout", "build_layout"]


@dataclass
class Bucket:
    params: list[torch.nn.Parameter]
    offsets: list[int]  # where each parameter starts, relative to the bucket's base
    base: int  # where the bucket starts in the group's flat buffer
    numel: int  # elements used by parameters
    padded: int  # numel rounded up to world_size * align
    chunk: int  # padded // world_size: one rank's share
    shard_offset: int  # where this bucket's chunk starts in a rank's shard

    def region(self, flat: torch.Tensor) -> torch.Tensor:
        return flat[self.base:self.base + self.padded]

    def chunk_of(self, shard: torch.Tensor) -> torch.Tensor:
        return shard[self.shard_offset:self.shard_offset + self.chunk]


@dataclass
class GroupLayout:
    buckets: list[Bucket]
    world_size: int
    total: int = 0  # flat buffer size, padding included
    shard_numel: int = 0
    where: dict[int, tuple[int, int]] = field(default_factory=dict)  # id(param) -> (bucket index, offset)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for b in self.buckets for p in b.params]


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def build_layout(params: list[torch.nn.Parameter], world_size: int, bucket_numel: int, align: int) -> GroupLayout:
    ordered = list(reversed(params))  # the order gradients become ready in backward
    layout = GroupLayout([], world_size)
    base = shard = 0
    for run in pack_runs([p.numel() for p in ordered], bucket_numel):  # zero-comm's bucketing, unaligned members
        members, offsets, used = ordered[run.start:run.stop], list(run.offsets), run.numel
        padded = _round_up(max(used, 1), world_size * align)
        bucket = Bucket(members, offsets, base, used, padded, padded // world_size, shard)
        for p, off in zip(members, offsets, strict=True):
            layout.where[id(p)] = (len(layout.buckets), off)
        layout.buckets.append(bucket)
        base += padded
        shard += bucket.chunk
    layout.total, layout.shard_numel = base, shard
    return layout
