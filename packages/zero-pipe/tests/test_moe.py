"""Expert parallelism: a mixture-of-experts layer with its experts spread over 1, 2 or 4 ranks computes what the
whole layer computes on each rank's tokens -- outputs, load-balancing loss, counts and gradients (the experts'
reduced over their own group) -- for top-1 and top-2 gating, with and without dropping, with a residual path."""

import moe_ranks
import pytest

from zero_comm.testing import run_ranks

GATES = [
    {"k": 1, "capacity_factor": 1.0, "min_capacity": 0, "use_rts": False},  # drops
    {"k": 1, "drop_tokens": False},
    {"k": 2, "capacity_factor": 0.5, "min_capacity": 0},  # drops
    {"k": 2, "use_residual": True},
]


@pytest.mark.parametrize("world,ep_size", [(1, 1), (2, 2), (4, 4), (4, 2)])
def test_expert_parallel_layer_matches_the_whole_layer(world: int, ep_size: int) -> None:
    local = moe_ranks.EXPERTS // ep_size
    for rank, names in enumerate(run_ranks(moe_ranks.expert_parallel_matches_whole_layer, world, ep_size, GATES)):
        first = rank % ep_size * local
        assert len(names) == len(GATES) * local * 4  # each expert: two linears, weight and bias
        assert {n.split(".")[1] for n in names} == {str(first + j) for j in range(local)}


def test_without_dropping_the_capacity_is_the_groups_largest_load() -> None:
    capacities = run_ranks(moe_ranks.no_drop_capacity_is_agreed, 2)
    assert capacities[0] == capacities[1]
