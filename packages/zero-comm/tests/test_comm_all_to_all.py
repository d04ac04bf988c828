"""all_to_all exchanges equal blocks of the first dimension (booked in the ledger), and the expert
groups follow DeepSpeed's layout: consecutive expert-parallel ranks, strided expert-data-parallel ones."""

import pytest
import torch

import zero_comm
from zero_comm.testing import WORLD_SIZES, run_ranks


def exchange(async_op: bool) -> tuple[list[float], int]:
    comm = zero_comm.init_distributed(ledger=zero_comm.CommLedger())
    n = comm.world_size
    sent = torch.arange(2.0 * n).reshape(n, 2) + 100 * comm.rank  # block i goes to rank i
    result = comm.all_to_all(sent, async_op=async_op)
    got = result.wait() if async_op else result
    assert got.shape == sent.shape
    return got.reshape(-1).tolist(), comm.ledger.entry("all_to_all").payload_bytes


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("async_op", [False, True])
def test_all_to_all_sends_block_i_to_rank_i(world: int, async_op: bool) -> None:
    for rank, (got, booked) in enumerate(run_ranks(exchange, world, async_op)):
        want = [100.0 * src + 2 * rank + j for src in range(world) for j in range(2)]
        assert got == want
        assert booked == 2 * world * 4


def uneven() -> str:
    comm = zero_comm.init_distributed()
    with pytest.raises(ValueError, match="must divide into 2 equal blocks") as info:
        comm.all_to_all(torch.zeros(3))
    return str(info.value)


def test_all_to_all_refuses_a_first_dimension_that_does_not_divide() -> None:
    assert all("all_to_all on group 'world'" in msg for msg in run_ranks(uneven, 2))


def test_expert_group_ranks_are_deepspeeds_layout() -> None:
    assert zero_comm.expert_group_ranks(4, 2) == ([[0, 1], [2, 3]], [[0, 2], [1, 3]])
    assert zero_comm.expert_group_ranks(4, 4) == ([[0, 1, 2, 3]], [[0], [1], [2], [3]])
    assert zero_comm.expert_group_ranks(2, 1) == ([[0], [1]], [[0, 1]])
    with pytest.raises(ValueError, match="ep_size 3 must be >= 1 and divide the world size 4"):
        zero_comm.expert_group_ranks(4, 3)


def groups(ep_size: int) -> tuple[int, int, int, int]:
    comm = zero_comm.init_distributed()
    g = zero_comm.build_expert_groups(ep_size)
    t = torch.tensor([float(comm.rank)])
    g.expert_data.all_reduce(t)
    return g.expert.world_size, g.expert.rank, g.expert_data.world_size, int(t.item())


def test_built_groups_hold_the_right_ranks() -> None:
    assert run_ranks(groups, 4, 2) == [(2, 0, 2, 2), (2, 1, 2, 4), (2, 0, 2, 2), (2, 1, 2, 4)]
    assert run_ranks(groups, 2, 2) == [(2, 0, 1, 0), (2, 1, 1, 1)]
