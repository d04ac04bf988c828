"""Expert-parallel groups: the ranks that exchange tokens, and the ranks that hold the same experts.

A mixture-of-experts layer spreads its experts over ``ep_size`` ranks. The world is
cut into consecutive *expert-parallel* groups of ``ep_size`` ranks (for 4 ranks and
``ep_size`` 2: ``[0, 1]`` and ``[2, 3]``): the tokens' all-to-all runs inside one,
between neighbours, which share the fastest links. The *expert-data-parallel* groups
link the ranks that hold the same experts (``[0, 2]`` and ``[1, 3]``): those experts'
gradients are reduced there, not over every rank. This is DeepSpeed's layout.

:func:`expert_group_ranks` is arithmetic, checkable without processes;
:func:`build_expert_groups` creates the process groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from ._communicator import CommError, ProcessGroupCommunicator
from ._ledger import CommLedger, default_ledger

__all__ = ["ExpertGroups", "build_expert_groups", "expert_group_ranks"]


def expert_group_ranks(world_size: int, ep_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """``(expert-parallel groups, expert-data-parallel groups)`` of a world, as lists of world ranks."""
    if ep_size < 1 or world_size % ep_size:
        raise ValueError(f"ep_size {ep_size} must be >= 1 and divide the world size {world_size}")
    expert = [list(range(start, start + ep_size)) for start in range(0, world_size, ep_size)]
    data = [list(range(first, world_size, ep_size)) for first in range(ep_size)]
    return expert, data


@dataclass(frozen=True)
class ExpertGroups:
    """This rank's two expert groups: ``expert`` exchanges tokens, ``expert_data`` reduces gradients."""

    ep_size: int
    expert: ProcessGroupCommunicator
    expert_data: ProcessGroupCommunicator


def build_expert_groups(ep_size: int, *, ledger: CommLedger | None = None) -> ExpertGroups:
    """Create the expert groups for ``ep_size``; every rank of the world must call it, in step."""
    if not dist.is_initialized():
        raise CommError("build_expert_groups needs torch.distributed; call zero_comm.init_distributed() first")
    world, rank = dist.get_world_size(), dist.get_rank()
    ledger = ledger if ledger is not None else default_ledger()
    found: dict[str, ProcessGroupCommunicator] = {}
    expert, data = expert_group_ranks(world, ep_size)
    for name, groups in (("ep", expert), ("ep_dp", data)):
        for ranks in groups:
            # every rank takes part in creating every group, members or not (torch's rule)
            group = dist.new_group(ranks) if len(ranks) < world else None
            if rank in ranks:
                found[name] = ProcessGroupCommunicator(group, name=f"{name}{ep_size}", ledger=ledger)
    return ExpertGroups(ep_size, found["ep"], found["ep_dp"])
