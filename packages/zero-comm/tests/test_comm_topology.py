"""A (pp, dp, tp) grid gives every rank its coordinates and its groups."""

import itertools

import pytest
import torch

import zero_comm
from zero_comm import Coordinate, ParallelDims, build_mesh
from zero_comm.testing import run_ranks

GRIDS_OF_4 = [(pp, dp, tp) for pp, dp, tp in itertools.product((1, 2, 4), repeat=3) if pp * dp * tp == 4]


@pytest.mark.parametrize("pp, dp, tp", GRIDS_OF_4)
def test_groups_partition_the_world(pp, dp, tp):
    dims = ParallelDims(4, pp=pp, dp=dp, tp=tp)
    sizes = {"pp": pp, "dp": dp, "tp": tp, "zero_shard": dp, "zero_replicate": 1}
    for name, size in sizes.items():
        groups = dims.groups(name)
        assert sorted(r for g in groups for r in g) == list(range(4)), name
        assert all(len(g) == size for g in groups), name
    for rank in range(4):
        c = dims.coordinate(rank)
        assert dims.rank(c) == rank
        # ranks in my tp group differ from me only in the tp coordinate, and so on
        for name in ("pp", "dp", "tp"):
            for other in dims.group_of(name, rank):
                oc = dims.coordinate(other)
                assert all(getattr(oc, d) == getattr(c, d) for d in ("pp", "dp", "tp") if d != name)


def test_tensor_parallel_is_the_fastest_dimension():
    dims = ParallelDims(8, pp=2, tp=2)
    assert dims.dp == 2
    assert dims.groups("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert dims.groups("dp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert dims.groups("pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert dims.coordinate(6) == Coordinate(pp=1, dp=1, tp=0)


def test_zero_sub_groups_split_data_parallel_groups():
    dims = ParallelDims(8, dp=8, zero_shard_size=4)
    assert dims.groups("zero_shard") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert dims.groups("zero_replicate") == [[0, 4], [1, 5], [2, 6], [3, 7]]


@pytest.mark.parametrize("kwargs, message", [
    (dict(world_size=4, pp=3), "not divisible by pp \\* tp"),
    (dict(world_size=4, pp=2, dp=4), "but the world size is 4"),
    (dict(world_size=4, tp=0), "tp must be >= 1"),
    (dict(world_size=4, zero_shard_size=3), "zero_shard_size 3 must be >= 1 and divide"),
])
def test_impossible_grids_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParallelDims(**kwargs)


def check_mesh(pp: int, dp: int, tp: int, zero_shard_size: int | None) -> bool:
    comm = zero_comm.init_distributed()
    dims = ParallelDims(comm.world_size, pp=pp, dp=dp, tp=tp, zero_shard_size=zero_shard_size)
    mesh = build_mesh(dims)
    assert mesh.coordinate == dims.coordinate(comm.rank)
    for name in ("pp", "dp", "tp", "zero_shard", "zero_replicate"):
        group = mesh.comm(name)
        members = [group.global_rank(i) for i in range(group.world_size)]
        assert members == dims.group_of(name, comm.rank), (name, members)
        # a sum over the group adds exactly its members' ranks
        t = torch.tensor([float(comm.rank)])
        group.all_reduce(t)
        assert t.item() == sum(members), name
    assert mesh.ledger.entry("all_reduce", "dp").calls == 1
    return True


@pytest.mark.parametrize("pp, dp, tp", GRIDS_OF_4)
def test_live_mesh_groups_on_four_ranks(pp, dp, tp):
    assert all(run_ranks(check_mesh, 4, pp, dp, tp, None))


def test_live_zero_sub_groups():
    assert all(run_ranks(check_mesh, 4, 1, 4, 1, 2))


def test_mesh_of_the_wrong_size_is_refused():
    run_ranks(check_wrong_size, 2)


def check_wrong_size() -> None:
    zero_comm.init_distributed()
    with pytest.raises(ValueError, match="describes 4 ranks but the world has 2"):
        build_mesh(ParallelDims(4))
