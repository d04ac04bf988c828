"""Buckets hold many tensors as flat, size-bounded buffers and give them back as views."""

import pytest
import torch

import zero_comm
from zero_comm import make_buckets
from zero_comm.testing import WORLD_SIZES, run_ranks


def tensors():
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (7,), (2, 2, 2), (100,), (1,), (5, 5)]
    out = [torch.randn(s, generator=g) for s in shapes]
    out.insert(2, torch.arange(6, dtype=torch.int64).view(2, 3))
    return out


def test_round_trip_through_views():
    ts = tensors()
    buckets = make_buckets(ts, max_bytes=128)
    members = [m for b in buckets for m in b.members]
    assert sorted(map(id, members)) == sorted(map(id, ts)), "every tensor lands in exactly one bucket"
    for b in buckets:
        assert len({m.dtype for m in b.members}) == 1
        for view, member in zip(b.views(), b.members):
            assert view.shape == member.shape and torch.equal(view, member)
            assert view.untyped_storage().data_ptr() == b.flat.untyped_storage().data_ptr()
        b.flat.mul_(2)
        b.scatter_back()
    assert all(torch.equal(t, 2 * o) for t, o in zip(ts, tensors()))


def test_buckets_respect_the_size_bound_except_for_oversized_tensors():
    ts = [torch.zeros(10) for _ in range(10)] + [torch.zeros(100)]
    buckets = make_buckets(ts, max_bytes=120)  # three 40-byte tensors per bucket
    assert [len(b.members) for b in buckets] == [3, 3, 3, 1, 1]
    assert all(b.nbytes <= 120 for b in buckets[:-1]) and buckets[-1].nbytes == 400


def test_alignment_pads_each_member_start():
    buckets = make_buckets([torch.ones(3), torch.ones(5), torch.ones(1)], align=4)
    (b,) = buckets
    assert b.offsets == [0, 4, 12] and b.flat.numel() == 16
    assert b.flat.sum() == 9, "padding is zero"


def test_bad_bucket_size_is_refused():
    with pytest.raises(ValueError, match="max_bytes must be positive"):
        make_buckets([torch.zeros(1)], max_bytes=0)


def check_coalesced() -> bool:
    comm = zero_comm.init_distributed()
    n, r = comm.world_size, comm.rank
    ts = [t * (r + 1) if t.is_floating_point() else t for t in tensors()]
    with comm.ledger.measure() as got:
        zero_comm.all_reduce_coalesced(comm, ts, "sum", bucket_bytes=256)
    scale = n * (n + 1) / 2
    for t, o in zip(ts, tensors()):
        want = o * scale if o.is_floating_point() else o * n
        assert torch.allclose(t, want, rtol=1e-6), (t, want)
    assert got.entry("all_reduce").calls == len(make_buckets(tensors(), 256))
    # broadcast a model's weights from rank 0
    ws = [torch.full((4,), float(r)), torch.full((2, 3), float(r))]
    handle = zero_comm.broadcast_coalesced(comm, ws, 0, async_op=True)
    handle.wait()
    assert all(torch.equal(w, torch.zeros_like(w)) for w in ws)
    return True


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_coalesced_collectives(world_size):
    assert all(run_ranks(check_coalesced, world_size))
