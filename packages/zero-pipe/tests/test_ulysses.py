"""Ulysses sequence parallelism: attention on a sequence split over 2 or 4 ranks (heads scattered, sequence
gathered by all-to-all) gives each rank its slice of the whole attention's output and gradients; heads that do
not divide over the ranks are refused in one line."""

import moe_ranks
import pytest

from zero_comm.testing import run_ranks


@pytest.mark.parametrize("world", [1, 2, 4])
def test_split_sequence_attention_matches_whole_attention(world: int) -> None:
    for results in run_ranks(moe_ranks.ulysses_matches_whole_attention, world, 4):
        for got, want in results:
            assert got == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_heads_that_do_not_divide_over_the_ranks_are_refused() -> None:
    for message in run_ranks(moe_ranks.ulysses_refuses_heads, 2, 3):
        assert message == (
            "sequence parallelism over 2 ranks: the query has 3 heads (dimension 2 of shape "
            "(2, 1, 3, 4)), not divisible by 2"
        )
