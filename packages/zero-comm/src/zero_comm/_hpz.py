"""Partition groups for hierarchical partitioning (ZeRO++'s hpZ): consecutive ranks, one node each.

With a partition size ``k`` the world is cut into consecutive groups of ``k`` ranks
(for 4 ranks and ``k`` 2: ``[0, 1]`` and ``[2, 3]``) -- neighbouring ranks, which
share a node and its fast links. Stage 3 keeps a second copy of each parameter
partitioned over such a group and gathers from it, so the gathers inside a step
never leave the node. Each group's communicator is named ``hpz<k>`` in the ledger,
so a step's traffic reads by group: the ``hpz`` rows inside the node, the
``world`` rows across.

:func:`partition_group_ranks` is arithmetic, checkable without processes;
:func:`build_partition_group` creates the process groups.
"""

from __future__ import annotations

import torch.distributed as dist

from ._communicator import CommError, ProcessGroupCommunicator
from ._ledger import CommLedger, default_ledger

__all__ = ["build_partition_group", "partition_group_ranks"]


def partition_group_ranks(world_size: int, size: int) -> list[list[int]]:
    """The consecutive groups of ``size`` world ranks that cut a world of ``world_size``."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or world_size % size:
        raise ValueError(f"the partition group size {size!r} must be a positive divisor of the world size "
                         f"{world_size}")
    return [list(range(start, start + size)) for start in range(0, world_size, size)]


def build_partition_group(size: int, *, ledger: CommLedger | None = None,
                          name: str | None = None) -> ProcessGroupCommunicator:
    """This rank's group of ``size`` consecutive ranks; every rank of the world must call it, in step.

    ``ledger``: where its calls are booked (default: the world's, under the group's ``name``,
    ``hpz<size>`` unless given), so per-group totals sit beside the world's.
    """
    if not dist.is_initialized():
        raise CommError("build_partition_group needs torch.distributed; call zero_comm.init_distributed() first")
    world, rank = dist.get_world_size(), dist.get_rank()
    ledger = ledger if ledger is not None else default_ledger()
    mine: ProcessGroupCommunicator | None = None
    for ranks in partition_group_ranks(world, size):
        # every rank takes part in creating every group, members or not (torch's rule)
        group = dist.new_group(ranks) if len(ranks) < world else None
        if rank in ranks:
            mine = ProcessGroupCommunicator(group, name=name or f"hpz{size}", ledger=ledger)
    assert mine is not None  # every rank is in exactly one group
    return mine
