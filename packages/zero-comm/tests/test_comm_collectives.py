"""Every collective gives the exact reference result at world sizes 1, 2 and 4.

Inputs are small integers, so sums are exact in every dtype and results can be
compared bit for bit with a reference computed on one rank from all ranks' inputs.
"""

import pytest
import torch

import zero_comm
from zero_comm.testing import WORLD_SIZES, run_ranks

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int64)
SIZES = (1, 5, 64, 1001)  # 1001 divides none of 2 and 4; 1 is smaller than the world


def rank_input(rank: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """The tensor rank `rank` contributes: distinct per rank, small integers."""
    return ((torch.arange(numel) * (rank + 3)) % 11 - 5 + rank).to(dtype)


def all_inputs(world: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.stack([rank_input(r, numel, dtype).double() for r in range(world)])


def check_all_reduce() -> int:
    comm = zero_comm.init_distributed()
    checks = 0
    for dtype in DTYPES:
        for numel in SIZES:
            stacked = all_inputs(comm.world_size, numel, dtype)
            expect = {"sum": stacked.sum(0), "max": stacked.max(0).values, "min": stacked.min(0).values}
            if dtype.is_floating_point:
                expect["avg"] = stacked.mean(0)
            for op, want in expect.items():
                t = rank_input(comm.rank, numel, dtype)
                out = comm.all_reduce(t, op)
                assert out is t, "all_reduce works in place"
                assert torch.equal(t, want.to(dtype)), f"all_reduce {op} {dtype} n={numel}"
                checks += 1
    # shaped (not flat) tensors reduce in place too
    m = torch.full((3, 4), comm.rank + 1.0)
    comm.all_reduce(m)
    assert torch.equal(m, torch.full((3, 4), comm.world_size * (comm.world_size + 1) / 2))
    return checks


def check_reduce_scatter() -> int:
    comm = zero_comm.init_distributed()
    checks = 0
    for dtype in DTYPES:
        for numel in (*SIZES, 0):
            full = rank_input(comm.rank, numel, dtype)
            before = full.clone()
            shard = comm.reduce_scatter(full)
            start, stop = zero_comm.shard_range(numel, comm.rank, comm.world_size)
            want = all_inputs(comm.world_size, numel, dtype).sum(0)[start:stop].to(dtype)
            assert shard.shape == (stop - start,), (dtype, numel, shard.shape)
            assert torch.equal(shard, want), f"reduce_scatter {dtype} n={numel}"
            assert torch.equal(full, before), "reduce_scatter must not modify its input"
            checks += 1
    # with out given, sync or async (Gloo: an all-to-all and a local sum): the same shard, the input intact
    assert comm.reduce_by_all_to_all == (comm.backend == "gloo")
    for numel in (1000, 1001, 4096):
        for async_op in (False, True):
            full = rank_input(comm.rank, numel, torch.float32)
            before = full.clone()
            start, stop = zero_comm.shard_range(numel, comm.rank, comm.world_size)
            out = torch.empty(-(-numel // comm.world_size))
            got = comm.reduce_scatter(full, "avg", out=out, async_op=async_op, consume_input=True)
            got = got.wait() if async_op else got
            want = (all_inputs(comm.world_size, numel, torch.float32).sum(0)[start:stop] / comm.world_size).float()
            assert torch.allclose(got, want) and got.data_ptr() == out.data_ptr(), (numel, async_op)
            assert torch.equal(full, before), "reduce_scatter must not modify its input"
            checks += 1
    # a result is data: an `out` that requires grad (a user's leaf tensor) is written without autograd
    leaf = torch.zeros(-(-1001 // comm.world_size), requires_grad=True)
    got = comm.reduce_scatter(rank_input(comm.rank, 1001, torch.float32), out=leaf)
    assert got.data_ptr() == leaf.data_ptr() and leaf.detach().abs().sum() > 0
    # the pieces of every rank's shard, put together, are the whole reduced tensor
    numel = 1001
    shard = comm.reduce_scatter(torch.ones(numel), "avg")
    gathered = comm.all_gather(shard, numel)
    assert torch.equal(gathered, torch.ones(numel))
    return checks


def check_all_gather() -> int:
    comm = zero_comm.init_distributed()
    checks = 0
    for dtype in DTYPES:
        for numel in (*SIZES, 0):
            full = rank_input(0, numel, dtype)  # the same logical tensor on every rank
            start, stop = zero_comm.shard_range(numel, comm.rank, comm.world_size)
            out = comm.all_gather(full[start:stop].clone(), numel)
            assert torch.equal(out, full), f"all_gather {dtype} n={numel}"
            checks += 1
        # equal shards, no numel: concatenation in rank order
        out = comm.all_gather(rank_input(comm.rank, 3, dtype))
        want = torch.cat([rank_input(r, 3, dtype) for r in range(comm.world_size)])
        assert torch.equal(out, want)
        checks += 1
    # into a caller's buffer
    buf = torch.empty(-(-10 // comm.world_size) * comm.world_size)
    start, stop = zero_comm.shard_range(10, comm.rank, comm.world_size)
    out = comm.all_gather(torch.arange(10.0)[start:stop].clone(), 10, out=buf)
    assert out.data_ptr() == buf.data_ptr() and torch.equal(out, torch.arange(10.0))
    with pytest.raises(ValueError, match="owns elements"):
        comm.all_gather(torch.zeros(stop - start + 1), 10)
    return checks


def check_broadcast_and_p2p() -> int:
    comm = zero_comm.init_distributed()
    n, r = comm.world_size, comm.rank
    checks = 0
    for dtype in DTYPES:
        for src in range(n):
            t = rank_input(r, 33, dtype)
            comm.broadcast(t, src)
            assert torch.equal(t, rank_input(src, 33, dtype))
            checks += 1
        # a ring: send to the right, receive from the left
        if n > 1:
            right, left = (r + 1) % n, (r - 1) % n
            got = torch.empty(17, dtype=dtype)
            h = comm.send(rank_input(r, 17, dtype), right, async_op=True)
            comm.recv(got, left)
            h.wait()
            assert torch.equal(got, rank_input(left, 17, dtype))
            got2 = torch.empty(17, dtype=dtype)
            comm.batch_p2p([zero_comm.P2P("send", rank_input(r, 17, dtype), right),
                            zero_comm.P2P("recv", got2, left)]).wait()
            assert torch.equal(got2, rank_input(left, 17, dtype))
            checks += 2
    with pytest.raises(ValueError, match="outside group"):
        comm.send(torch.zeros(1), n)
    comm.barrier()
    comm.barrier(async_op=True).wait()
    return checks


def check_async_handles() -> bool:
    comm = zero_comm.init_distributed()
    n, numel = comm.world_size, 1001
    a = rank_input(comm.rank, numel, torch.float32)
    b = rank_input(comm.rank, numel, torch.float32)
    start, stop = zero_comm.shard_range(numel, comm.rank, n)
    # three collectives in flight at once, waited on in reverse order
    h_ar = comm.all_reduce(a, async_op=True)
    h_rs = comm.reduce_scatter(b, async_op=True)
    h_ag = comm.all_gather(torch.arange(numel, dtype=torch.float32)[start:stop].clone(), numel, async_op=True)
    assert isinstance(h_ar, zero_comm.Handle)
    gathered, shard, reduced = h_ag.wait(), h_rs.wait(), h_ar.wait()
    want = all_inputs(n, numel, torch.float32).sum(0).float()
    assert torch.equal(reduced, want)
    assert torch.equal(shard, want[start:stop])
    assert torch.equal(gathered, torch.arange(numel, dtype=torch.float32))
    assert h_ar.wait() is reduced and h_ar.is_completed(), "waiting twice returns the same result"
    return True


def check_into_caller_buffers() -> bool:
    """Evenly sized collectives into the caller's buffers (the bucketed-training path)."""
    comm = zero_comm.init_distributed()
    n, r = comm.world_size, comm.rank
    for dtype in (torch.float32, torch.bfloat16):
        full = rank_input(r, 64 * n, dtype)
        total = all_inputs(n, 64 * n, dtype).sum(0)
        for op, want in (("sum", total), ("avg", total / n)):
            out = torch.empty(64, dtype=dtype)
            with comm.ledger.measure() as booked:
                got = comm.reduce_scatter(full, op, out=out)
            assert got.data_ptr() == out.data_ptr()
            assert torch.equal(got, want[r * 64:(r + 1) * 64].to(dtype)), (dtype, op)
            assert booked.entry("reduce_scatter").payload_bytes == full.numel() * full.element_size()
        gathered = torch.empty(64 * n, dtype=dtype)
        got = comm.all_gather(rank_input(r, 64, dtype), out=gathered)
        assert got.data_ptr() == gathered.data_ptr()
        assert torch.equal(got, torch.cat([rank_input(q, 64, dtype) for q in range(n)]))
    return True


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("check", [check_all_reduce, check_reduce_scatter, check_all_gather,
                                   check_broadcast_and_p2p, check_async_handles, check_into_caller_buffers],
                         ids=lambda f: f.__name__.removeprefix("check_"))
def test_collective(check, world_size):
    results = run_ranks(check, world_size)
    assert len(results) == world_size and all(results)


def test_bad_arguments_are_named_errors():
    run_ranks(check_bad_arguments, 1)


def check_bad_arguments() -> None:
    comm = zero_comm.init_distributed()
    with pytest.raises(ValueError, match="contiguous"):
        comm.all_reduce(torch.zeros(4, 4).t())
    with pytest.raises(ValueError, match="unknown reduce op"):
        comm.all_reduce(torch.zeros(2), "mean")
    with pytest.raises(ValueError, match="floating-point"):
        comm.all_reduce(torch.zeros(2, dtype=torch.int64), "avg")
    with pytest.raises(ValueError, match="out must be"):
        comm.reduce_scatter(torch.zeros(8), out=torch.zeros(3))
