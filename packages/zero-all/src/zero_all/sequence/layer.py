"""``deepspeed.sequence.layer.DistributedAttention``: zero-pipe's :class:`~zero_pipe.UlyssesAttention`
with DeepSpeed's arguments (a process group, or ``None`` for every rank)."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import nn

import zero_comm
import zero_pipe

__all__ = ["DistributedAttention"]


class DistributedAttention(zero_pipe.UlyssesAttention):
    """DeepSpeed's ``DistributedAttention(local_attention, sequence_process_group, scatter_idx=2,
    gather_idx=0, sp_stream=None)``: ``forward(query, key, value, *args, **kwargs)`` on this rank's slice
    of the sequence. ``sequence_process_group`` is a torch process group or a zero Communicator."""

    def __init__(
        self,
        local_attention: nn.Module | Any,
        sequence_process_group: Any = None,
        scatter_idx: int = 2,
        gather_idx: int = 0,
        sp_stream: Any = None,
    ):
        if sp_stream is not None:
            raise NotImplementedError(
                "DistributedAttention(sp_stream=...): overlapping the all-to-alls on a side "
                "stream is not supported; leave it None"
            )
        group = sequence_process_group
        if isinstance(group, zero_comm.Communicator):
            comm = group
        elif group is None or isinstance(group, dist.ProcessGroup):
            zero_comm.init_distributed()
            comm = zero_comm.ProcessGroupCommunicator(group, name="sp" if group is not None else "world")
        else:
            raise TypeError(
                f"DistributedAttention: sequence_process_group must be a torch process group, a zero "
                f"Communicator or None, got {type(group).__name__}"
            )
        super().__init__(local_attention, comm, scatter_idx=scatter_idx, gather_idx=gather_idx)
