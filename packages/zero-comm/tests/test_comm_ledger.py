"""The ledger books payload and nccl-tests bus bytes exactly as the analytic formulas say."""

import math

import pytest
import torch

import zero_comm
from zero_comm import CommLedger, LedgerEntry, bus_factor
from zero_comm.testing import WORLD_SIZES, run_ranks


def test_bus_factors_match_nccl_tests():
    assert bus_factor("all_reduce", 4) == pytest.approx(1.5)
    assert bus_factor("reduce_scatter", 4) == pytest.approx(0.75)
    assert bus_factor("all_gather", 2) == pytest.approx(0.5)
    assert bus_factor("broadcast", 8) == 1.0 and bus_factor("send", 2) == 1.0
    assert bus_factor("all_reduce", 1) == 0.0
    with pytest.raises(ValueError, match="unknown collective kind 'alltoall'"):
        bus_factor("alltoall", 2)


def test_booking_sums_per_kind_and_group():
    ledger = CommLedger()
    ledger.book("all_reduce", "dp", 100, 2)
    ledger.book("all_reduce", "dp", 50, 2)
    ledger.book("all_reduce", "tp", 10, 4)
    assert ledger.entry("all_reduce", "dp") == LedgerEntry(2, 150, 150.0)
    assert ledger.entry("all_reduce") == LedgerEntry(3, 160, 150.0 + 15.0)
    with ledger.measure() as step:
        ledger.book("all_gather", "dp", 8, 2)
    assert step.snapshot() == {("all_gather", "dp"): LedgerEntry(1, 8, 4.0)}
    assert ledger.entry("all_gather").calls == 1  # kept in the outer ledger too
    assert "all_reduce" in ledger.summary()
    ledger.reset()
    assert ledger.snapshot() == {}


def check_ledger_counts() -> bool:
    comm = zero_comm.init_distributed()
    n, numel = comm.world_size, 1001
    padded = math.ceil(numel / n) * n
    with comm.ledger.measure() as got:
        comm.all_reduce(torch.zeros(numel))
        comm.reduce_scatter(torch.zeros(numel, dtype=torch.bfloat16))
        start, stop = zero_comm.shard_range(numel, comm.rank, n)
        comm.all_gather(torch.zeros(stop - start, dtype=torch.float16), numel)
        comm.broadcast(torch.zeros(10, dtype=torch.int64), 0)
        zero_comm.all_reduce_coalesced(comm, [torch.zeros(100), torch.zeros(200)], bucket_bytes=1 << 20)
    assert got.entry("all_reduce") == LedgerEntry(2, numel * 4 + 300 * 4, (numel + 300) * 4 * 2 * (n - 1) / n)
    assert got.entry("reduce_scatter") == LedgerEntry(1, padded * 2, padded * 2 * (n - 1) / n)
    assert got.entry("all_gather") == LedgerEntry(1, padded * 2, padded * 2 * (n - 1) / n)
    assert got.entry("broadcast") == LedgerEntry(1, 80, 80.0)
    assert {g for (_, g) in got.snapshot()} == {"world"}
    return True


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_ledger_equals_analytic_counts(world_size):
    assert all(run_ranks(check_ledger_counts, world_size))
