"""ZeRO-Infinity's memory promise: with parameters, gradients and optimizer state on NVMe, what a
rank holds while training is the working set of its largest layer plus the store's buffer budget --
the same for a model four times larger.

Every tensor allocation and free of the process is recorded by the torch profiler from
before the model is built; the peak of live bytes is taken over two training steps.
"""

import sys
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import zero_comm
from zero_comm.testing import run_ranks
from zero_offload import NVMeStore
from zero_optim import AdamW, ZeroConfig, ZeroStage3, partitioned

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "packages" / "zero-optim" / "tests"))
import zero_models

D, BUDGET, MARK = 256, 20 << 20, 777_773  # MARK: an allocation of a size nothing else has


def training_peak(layers: int, swap_dir: str, overlap_comm: bool = True) -> dict[str, int]:
    comm = zero_comm.init_distributed()
    torch.manual_seed(0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with partitioned(comm):
            model = zero_models.GPT(layers=layers, d=D, recompute=True)
        store = NVMeStore(swap_dir, buffer_bytes=BUDGET, block_bytes=1 << 20)
        config = ZeroConfig(stage=3, offload_param=True, unit_numel=1_000_000, persistence_threshold=1000,
                            prefetch_numel=0, overlap_comm=overlap_comm)
        opt = ZeroStage3(model, AdamW(lr=1e-3), comm=comm, config=config, store=store)
        marker = torch.empty(MARK, dtype=torch.uint8)  # training starts here
        del marker
        for step in range(2):
            x, y = zero_models.batch("gpt", step, 2 * comm.world_size)
            per_rank = x.shape[0] // comm.world_size
            mine = slice(comm.rank * per_rank, (comm.rank + 1) * per_rank)
            opt.backward(model(x[mine], y[mine]))
            assert opt.step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live, peak, training = 0, 0, False
    for _, nbytes in events:
        live += nbytes
        training = training or nbytes == MARK
        if training:
            peak = max(peak, live)
    assert training, "the marker allocation was not recorded"
    largest_unit = max(u.padded for u in opt.units) * 4
    states = sum(u.numel for u in opt.units) * 16  # fp32 weights and gradients, two Adam moments
    out = {"peak": peak, "largest_unit": largest_unit, "states": states,
           "peak_buffers": store.stats.peak_buffer_bytes, "read": store.stats.bytes_read}
    store.close()
    return out


@pytest.mark.parametrize(("world_size", "overlap_comm"), [(1, True), (2, True), (2, False)])
def test_live_memory_is_the_largest_layer_plus_the_budget_whatever_the_model_size(world_size: int,
                                                                                    overlap_comm: bool,
                                                                                    tmp_path: Path):
    small, = run_ranks(training_peak, world_size, 2, str(tmp_path), overlap_comm)[:1]
    large, = run_ranks(training_peak, world_size, 9, str(tmp_path), overlap_comm)[:1]
    assert large["states"] >= 4 * small["states"]
    assert large["largest_unit"] == small["largest_unit"]
    unit = large["largest_unit"]
    # The working set, in units, measured with the profiler's stacks at the peak (in backward, as the
    # next block is gathered): that block's parameters and Gloo's all-gather output before it lands
    # there (2), the gradients of the block being staged (1), the previous block's staging with its
    # reduce-scatter in flight under overlap_comm (1) with, on Gloo, the blocks its all-to-all receives
    # (1: zero-comm reduces that way there, twice as fast as Gloo's own reduce-scatter), its reduced
    # shard (1/world), and activations. Measured 5.6-5.8 with overlap_comm (4.4-5.1 when Gloo's
    # reductions were all-reduces in place), 2.9-3.3 without. (A finished collective's buffers stay
    # referenced by Gloo until its worker thread next runs, so staging memory and the received blocks
    # are released explicitly: before that, a busy machine measured up to 10 units here.)
    units = 6 if overlap_comm else 4
    outside = {}
    for name, run in (("small", small), ("large", large)):
        assert run["peak_buffers"] <= BUDGET
        outside[name] = run["peak"] - run["peak_buffers"]
        assert outside[name] <= units * unit + (1 << 20), (run, outside[name] / unit)
        assert run["peak"] <= BUDGET + units * unit + (1 << 20), run
    # four times the model, the same memory outside the buffers: the difference is a few layers'
    # saved activations (measured 0.4-1.004 units; the slack is the allocator noise allowed above)
    assert abs(outside["large"] - outside["small"]) <= unit + (1 << 20), (small, large)
    # the states could not have been held: twice what the rank ever held at once (measured 2.9x)
    assert large["read"] > 0 and large["states"] > 2 * large["peak"], large
