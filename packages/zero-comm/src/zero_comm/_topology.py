"""Groups and topology: carve the world into pipeline-, data- and tensor-parallel groups.

Ranks are laid out on a ``(pp, dp, tp)`` grid with tensor parallelism fastest
(neighbouring ranks, the fastest links, share a tensor-parallel group) and
pipeline stages slowest::

    rank = (pp_index * dp + dp_index) * tp + tp_index

ZeRO sub-groups (hierarchical partitioning, as in ZeRO++ hpZ and MiCS) split each
data-parallel group into consecutive ``zero_shard`` groups of a given size, whose
members shard state among themselves, and ``zero_replicate`` groups that link
the ranks holding the same shard.

:class:`ParallelDims` is pure arithmetic, checkable without processes;
:func:`build_mesh` turns it into live process groups through torch's DeviceMesh.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.distributed as dist

from ._communicator import CommError, ProcessGroupCommunicator
from ._ledger import CommLedger, default_ledger

__all__ = ["Coordinate", "GroupName", "Mesh", "ParallelDims", "build_mesh"]

GroupName = Literal["pp", "dp", "tp", "zero_shard", "zero_replicate"]


@dataclass(frozen=True)
class Coordinate:
    pp: int
    dp: int
    tp: int


@dataclass(frozen=True)
class ParallelDims:
    """The shape of the job: ``pp * dp * tp == world_size``.

    Args:
        world_size: number of ranks.
        pp: pipeline stages. tp: tensor-parallel degree.
        dp: data-parallel degree; ``-1`` infers it as ``world_size // (pp * tp)``.
        zero_shard_size: size of the ZeRO sub-groups inside each data-parallel
            group; ``None`` shards over the whole data-parallel group.
    """

    world_size: int
    pp: int = 1
    dp: int = -1
    tp: int = 1
    zero_shard_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("world_size", "pp", "tp"):
            if getattr(self, name) < 1:
                raise ValueError(f"ParallelDims.{name} must be >= 1, got {getattr(self, name)}")
        if self.dp == -1:
            if self.world_size % (self.pp * self.tp):
                raise ValueError(f"world size {self.world_size} is not divisible by pp * tp = "
                                 f"{self.pp} * {self.tp}")
            object.__setattr__(self, "dp", self.world_size // (self.pp * self.tp))
        if self.dp < 1:
            raise ValueError(f"ParallelDims.dp must be >= 1 or -1 (infer), got {self.dp}")
        if self.pp * self.dp * self.tp != self.world_size:
            raise ValueError(f"pp * dp * tp = {self.pp} * {self.dp} * {self.tp} = "
                             f"{self.pp * self.dp * self.tp}, but the world size is {self.world_size}")
        z = self.zero_shard_size
        if z is not None and (z < 1 or self.dp % z):
            raise ValueError(f"zero_shard_size {z} must be >= 1 and divide the data-parallel degree {self.dp}")

    @property
    def shard_size(self) -> int:
        return self.zero_shard_size or self.dp

    def coordinate(self, rank: int) -> Coordinate:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a world of size {self.world_size}")
        return Coordinate(pp=rank // (self.dp * self.tp), dp=(rank // self.tp) % self.dp, tp=rank % self.tp)

    def rank(self, coord: Coordinate) -> int:
        return (coord.pp * self.dp + coord.dp) * self.tp + coord.tp

    def groups(self, name: GroupName) -> list[list[int]]:
        """Every group of kind ``name`` as a list of world ranks, in group-rank order."""
        grid = [[[self.rank(Coordinate(p, d, t)) for t in range(self.tp)]
                 for d in range(self.dp)] for p in range(self.pp)]
        z = self.shard_size
        if name == "tp":
            return [grid[p][d] for p in range(self.pp) for d in range(self.dp)]
        if name == "dp":
            return [[grid[p][d][t] for d in range(self.dp)] for p in range(self.pp) for t in range(self.tp)]
        if name == "pp":
            return [[grid[p][d][t] for p in range(self.pp)] for d in range(self.dp) for t in range(self.tp)]
        if name == "zero_shard":
            return [[grid[p][r * z + i][t] for i in range(z)]
                    for p in range(self.pp) for t in range(self.tp) for r in range(self.dp // z)]
        if name == "zero_replicate":
            return [[grid[p][r * z + i][t] for r in range(self.dp // z)]
                    for p in range(self.pp) for t in range(self.tp) for i in range(z)]
        raise ValueError(f"unknown group {name!r}; expected pp, dp, tp, zero_shard or zero_replicate")

    def group_of(self, name: GroupName, rank: int) -> list[int]:
        """The world ranks of the ``name`` group that ``rank`` belongs to."""
        for members in self.groups(name):
            if rank in members:
                return members
        raise AssertionError(f"rank {rank} is in no {name} group")  # unreachable for a valid rank


@dataclass
class Mesh:
    """This rank's place in the job and a communicator for each of its groups.

    All communicators share one ledger, so one step's traffic on every group is
    read in one place.
    """

    dims: ParallelDims
    rank: int
    coordinate: Coordinate
    world: ProcessGroupCommunicator
    pp: ProcessGroupCommunicator
    dp: ProcessGroupCommunicator
    tp: ProcessGroupCommunicator
    zero_shard: ProcessGroupCommunicator
    zero_replicate: ProcessGroupCommunicator
    ledger: CommLedger
    device_mesh: object

    def comm(self, name: GroupName | Literal["world"]) -> ProcessGroupCommunicator:
        return getattr(self, name)


def build_mesh(dims: ParallelDims, *, ledger: CommLedger | None = None,
               device_type: str | None = None) -> Mesh:
    """Create the process groups of ``dims``; every rank of the world must call this, in step.

    The (pp, dp, tp) groups come from ``torch.distributed.device_mesh`` (so
    DTensor-based code can share them through :attr:`Mesh.device_mesh`); ZeRO
    sub-groups come from a second, finer device mesh.
    """
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise CommError("build_mesh needs torch.distributed; call zero_comm.init_distributed() first")
    world_size = dist.get_world_size()
    if dims.world_size != world_size:
        raise ValueError(f"ParallelDims describes {dims.world_size} ranks but the world has {world_size}")
    if device_type is None:
        device_type = "cuda" if "nccl" in str(dist.get_backend()) else "cpu"
    ledger = ledger if ledger is not None else default_ledger()
    rank = dist.get_rank()
    mesh = init_device_mesh(device_type, (dims.pp, dims.dp, dims.tp), mesh_dim_names=("pp", "dp", "tp"))
    comms = {name: ProcessGroupCommunicator(mesh.get_group(name), name=name, ledger=ledger)
             for name in ("pp", "dp", "tp")}
    z = dims.shard_size
    fine = init_device_mesh(device_type, (dims.pp, dims.dp // z, z, dims.tp),
                            mesh_dim_names=("pp", "zero_replicate", "zero_shard", "tp"))
    for name in ("zero_shard", "zero_replicate"):
        comms[name] = ProcessGroupCommunicator(fine.get_group(name), name=name, ledger=ledger)
    return Mesh(dims=dims, rank=rank, coordinate=dims.coordinate(rank),
                world=ProcessGroupCommunicator(None, name="world", ledger=ledger),
                ledger=ledger, device_mesh=mesh, **comms)

