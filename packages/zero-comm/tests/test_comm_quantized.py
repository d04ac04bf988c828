"""Quantised collectives (ZeRO++'s qwZ and qgZ) and hpZ's partition groups.

A quantised all-gather gives every rank the same decoded shards, and a quantised reduce-scatter the
sum (or mean) of the decoded chunks, within the codec's error; the ledger books the compressed bytes
that travelled (int8 plus scales: about a quarter of fp32). On one rank both are exact. Partition
groups are consecutive ranks, named ``hpz<k>`` in the ledger.
"""

import pytest
import torch

import zero_comm
from zero_comm.testing import WORLD_SIZES, run_ranks

BLOCK = 64


class Int8Rows:
    """A small blockwise int8 codec (zero-kernels has the real one; zero-comm cannot import it)."""

    def encode(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r, c = rows.shape
        nb = -(-c // BLOCK)
        x = torch.nn.functional.pad(rows.float(), (0, nb * BLOCK - c)).view(r, nb, BLOCK)
        scales = x.abs().amax(-1) / 127
        q = torch.where(scales[..., None] > 0, x / scales[..., None].clamp_min(1e-30), 0).round()
        return q.to(torch.int8).view(r, -1)[:, :c].contiguous(), scales

    def decode(self, values: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> None:
        per_element = scales.repeat_interleave(BLOCK, dim=1)[:, :values.shape[1]]
        out.copy_(values.float() * per_element)


def data(rank: int, numel: int) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(rank))


def gather(chunk: int, dtype: torch.dtype, async_op: bool) -> dict:
    comm = zero_comm.init_distributed(ledger=zero_comm.CommLedger())
    shard = data(comm.rank, chunk).to(dtype)
    out = torch.empty(chunk * comm.world_size, dtype=dtype)
    result = zero_comm.quantized_all_gather(comm, shard, Int8Rows(), out=out, async_op=async_op)
    got = result.wait() if async_op else result
    assert got.data_ptr() == out.data_ptr()
    return {"got": got.float(), "bytes": comm.ledger.entry("all_gather").payload_bytes}


@pytest.mark.parametrize(("world", "async_op"), [(w, False) for w in WORLD_SIZES] + [(2, True)])
def test_quantized_all_gather_decodes_every_shard(world, async_op):
    chunk = 1000
    want = torch.cat([data(r, chunk) for r in range(world)])
    results = run_ranks(gather, world, chunk, torch.float32, async_op)
    for r in results:
        assert torch.equal(r["got"], results[0]["got"]), "every rank holds the same values"
        if world == 1:
            assert torch.equal(r["got"], want) and r["bytes"] == 0
            continue
        assert ((r["got"] - want).norm() / want.norm()).item() < 0.01
        sent = world * (chunk + 4 * -(-chunk // BLOCK))  # int8 values and fp32 scales, nothing padded
        assert r["bytes"] == sent and sent <= 0.27 * world * chunk * 4


def scatter(numel: int, op: str) -> dict:
    comm = zero_comm.init_distributed(ledger=zero_comm.CommLedger())
    got = zero_comm.quantized_reduce_scatter(comm, data(comm.rank, numel).to(torch.bfloat16), Int8Rows(), op)
    return {"got": got.float(), "dtype": got.dtype, "a2a": comm.ledger.entry("all_to_all").payload_bytes,
            "rs": comm.ledger.entry("reduce_scatter").payload_bytes}


@pytest.mark.parametrize(("world", "op"), [(w, "avg") for w in WORLD_SIZES] + [(2, "sum")])
def test_quantized_reduce_scatter_sums_the_decoded_chunks(world, op):
    numel = 4001  # does not divide: the last chunk is padded, as reduce_scatter pads it
    total = sum(data(r, numel).to(torch.bfloat16).float() for r in range(world))
    if op == "avg":
        total = total / world
    chunk = -(-numel // world)
    for rank, r in enumerate(run_ranks(scatter, world, numel, op)):
        want = torch.nn.functional.pad(total, (0, chunk * world - numel))[rank * chunk:(rank + 1) * chunk]
        assert r["dtype"] == torch.bfloat16
        assert ((r["got"] - want).norm() / want.norm()).item() < (0.01 if world > 1 else 0.005)
        if world > 1:
            assert r["rs"] == 0 and r["a2a"] == world * (chunk + 4 * -(-chunk // BLOCK))


def refused() -> str:
    comm = zero_comm.init_distributed()
    with pytest.raises(ValueError, match="op must be 'sum' or 'avg'") as info:
        zero_comm.quantized_reduce_scatter(comm, torch.zeros(8), Int8Rows(), "max")
    return str(info.value)


def test_quantized_reduce_scatter_refuses_max():
    run_ranks(refused, 2)


def test_partition_group_ranks_are_consecutive():
    assert zero_comm.partition_group_ranks(4, 2) == [[0, 1], [2, 3]]
    assert zero_comm.partition_group_ranks(8, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert zero_comm.partition_group_ranks(2, 1) == [[0], [1]]
    with pytest.raises(ValueError, match="partition group size 3 must be a positive divisor of the world size 4"):
        zero_comm.partition_group_ranks(4, 3)


def group_sum(size: int) -> tuple[int, int, int, dict]:
    comm = zero_comm.init_distributed(ledger=zero_comm.CommLedger())
    group = zero_comm.build_partition_group(size, ledger=comm.ledger)
    t = torch.tensor([float(comm.rank)])
    group.all_reduce(t)
    return group.world_size, group.rank, int(t.item()), {g: e.calls for (_, g), e in comm.ledger.snapshot().items()}


def test_built_partition_groups_hold_consecutive_ranks_and_book_under_their_name():
    results = run_ranks(group_sum, 4, 2)
    assert [r[:3] for r in results] == [(2, 0, 1), (2, 1, 1), (2, 0, 5), (2, 1, 5)]
    assert all(r[3] == {"hpz2": 1} for r in results)
