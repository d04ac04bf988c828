"""pack_runs splits sizes, in order, into consecutive bounded runs and places each member in its run:
the packing both zero-comm's buckets and zero-optim's flat layout are built from."""

import pytest

from zero_comm import PackedRun, pack_runs


def test_runs_are_consecutive_bounded_and_offsets_are_end_to_end():
    runs = pack_runs([3, 4, 2, 5, 1], limit=7)
    assert runs == [PackedRun(0, (0, 3), 7), PackedRun(2, (0, 2), 7), PackedRun(4, (0,), 1)]
    assert [(r.start, r.stop) for r in runs] == [(0, 2), (2, 4), (4, 5)]


def test_a_member_larger_than_the_limit_is_a_run_of_its_own():
    runs = pack_runs([2, 10, 2, 2], limit=4)
    assert [(r.start, r.stop, r.numel) for r in runs] == [(0, 1, 2), (1, 2, 10), (2, 4, 4)]


def test_alignment_rounds_each_member_up_and_counts_the_padding_against_the_limit():
    runs = pack_runs([3, 5, 1, 4], limit=12, align=4)
    assert runs == [PackedRun(0, (0, 4), 12), PackedRun(2, (0, 4), 8)]


def test_empty_members_and_sequences():
    assert pack_runs([], limit=8) == []
    assert pack_runs([0, 0, 3], limit=3) == [PackedRun(0, (0, 0, 0), 3)]
    assert pack_runs([1, 1], limit=0) == [PackedRun(0, (0,), 1), PackedRun(1, (0,), 1)]


def test_every_member_lands_in_exactly_one_run_in_order():
    sizes = [(i * 37) % 50 for i in range(200)]
    for limit in (1, 16, 64, 1000):
        runs = pack_runs(sizes, limit=limit, align=8)
        assert [i for r in runs for i in range(r.start, r.stop)] == list(range(len(sizes)))
        for r in runs:
            assert r.numel <= limit or r.stop - r.start == 1
            assert all(o % 8 == 0 for o in r.offsets)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"sizes": [1], "limit": -1}, "limit must be >= 0, got -1"),
    ({"sizes": [1], "limit": 4, "align": 0}, "align must be >= 1, got 0"),
    ({"sizes": [1, -2], "limit": 4}, r"size 1 is negative \(-2\)"),
])
def test_bad_input_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pack_runs(kwargs.pop("sizes"), **kwargs)
