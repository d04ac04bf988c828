"""zero-comm: collectives, groups, bucketing and a comm ledger over torch.distributed.

The lowest layer of zero. Everything above it talks to other ranks through a
:class:`Communicator`, so every byte moved is booked in a :class:`CommLedger`.
"""

from ._bucket import FlatBucket, PackedRun, all_reduce_coalesced, broadcast_coalesced, make_buckets, pack_runs
from ._communicator import (
    P2P,
    CommError,
    Communicator,
    Handle,
    ProcessGroupCommunicator,
    ReduceOp,
    shard_range,
)
from ._expert import ExpertGroups, build_expert_groups, expert_group_ranks
from ._hpz import build_partition_group, partition_group_ranks
from ._launch import LaunchEnv, default_timeout, detect_launch_env, expand_slurm_nodelist, init_distributed
from ._ledger import COLLECTIVE_KINDS, CommLedger, LedgerEntry, bus_factor, default_ledger
from ._quantized import RowCodec, quantized_all_gather, quantized_reduce_scatter
from ._topology import Coordinate, Mesh, ParallelDims, build_mesh

__version__ = "0.3.0"

__all__ = [
    "COLLECTIVE_KINDS",
    "P2P",
    "CommError",
    "CommLedger",
    "Communicator",
    "Coordinate",
    "ExpertGroups",
    "FlatBucket",
    "Handle",
    "LaunchEnv",
    "LedgerEntry",
    "Mesh",
    "PackedRun",
    "ParallelDims",
    "ProcessGroupCommunicator",
    "ReduceOp",
    "RowCodec",
    "all_reduce_coalesced",
    "broadcast_coalesced",
    "build_expert_groups",
    "build_mesh",
    "build_partition_group",
    "bus_factor",
    "default_ledger",
    "default_timeout",
    "detect_launch_env",
    "expand_slurm_nodelist",
    "expert_group_ranks",
    "init_distributed",
    "make_buckets",
    "pack_runs",
    "partition_group_ranks",
    "quantized_all_gather",
    "quantized_reduce_scatter",
    "shard_range",
]
