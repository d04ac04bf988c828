"""ZeRO-Offload and ZeRO-Infinity train exactly like a single-process torch.optim.AdamW loop.

zero-optim's stages with zero-offload's stores, AdamW stepped on the CPU (zero-kernels' CPU Adam
over the host shards): the optimizer state in
host memory (stage 2), on NVMe files (stage 1), and in stage 3 the optimizer state,
the parameter shards and the gradient shards all in host memory or all on NVMe, read ahead of use through
a small buffer budget. Losses, no-grad evaluations and every weight match the plain
loop to 1e-5 (fp32) on 1 and 2 ranks, and the bytes really went through the files.
"""

import sys
from pathlib import Path

import pytest
import torch

import zero_comm
from zero_comm.testing import run_ranks
from zero_offload import HostStore, NVMeStore
from zero_optim import AdamW, ZeroConfig, ZeroOptimizer, ZeroStage3, partitioned

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "packages" / "zero-optim" / "tests"))
import zero_models
from parity import LR, STEPS, WD, max_rel, reference, rel, train

CASES = {
    # name: (stage, store, accumulation, clip, options)
    "stage 2, optimizer on cpu": (2, "cpu", 1, None, {}),
    "stage 1, optimizer on nvme, accumulation, clipping": (1, "nvme", 2, 0.5, {}),
    "stage 3, optimizer and parameters on cpu": (3, "cpu", 1, None, {"offload_param": True}),
    "stage 3, optimizer and parameters on nvme": (3, "nvme", 1, None, {"offload_param": True}),
    "stage 3, everything on nvme, accumulation, clipping, blocks as units":
        (3, "nvme", 2, 0.5, {"offload_param": True, "unit_numel": 250_000, "persistence_threshold": 300}),
}


def train_offloaded(case: str, swap_dir: str) -> tuple[list[float], dict[str, torch.Tensor], list[float], dict]:
    stage, where, accum, clip, options = CASES[case]
    comm = zero_comm.init_distributed()
    # a budget of a few layers' state: most of the model is on disk at any time
    store = HostStore() if where == "cpu" else NVMeStore(swap_dir, buffer_bytes=24 << 20, block_bytes=1 << 20)
    rule = AdamW(lr=LR, weight_decay=WD)
    config = ZeroConfig(stage=stage, accumulation_steps=accum, clip_grad_norm=clip, bucket_numel=100_000,
                        **options)
    if stage == 3:
        with partitioned(comm):
            model = zero_models.make_model("gpt")
        opt = ZeroStage3(model, rule, comm=comm, config=config, store=store)
    else:
        model = zero_models.make_model("gpt")
        opt = ZeroOptimizer(model.named_parameters(), rule, comm=comm, config=config, store=store)
    if isinstance(store, NVMeStore):  # nothing cached across steps: each step reads its state from disk
        opt.register_step_pre_hook(lambda _: store.drop_cache())
    losses, evals = train(model, opt, comm, "gpt", accum)
    if stage == 3:
        weights = opt.consolidated_state_dict(rank0_only=False)
    else:
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    io = {}
    if isinstance(store, NVMeStore):
        stats = store.stats
        io = {"read": stats.bytes_read, "written": stats.bytes_written, "on_disk": store.nbytes(),
              "prefetched": stats.reads_prefetched, "peak_buffers": stats.peak_buffer_bytes,
              "budget": store.buffer_bytes, "keys": len(store.keys())}
        directory = store.directory
        store.close()
        assert not directory.exists(), "swap files left behind"
    return losses, weights, evals, io


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_offloaded_training_matches_single_process(case: str, world_size: int, tmp_path: Path):
    _, _, accum, clip, options = CASES[case]
    (want_losses, want_weights, want_evals), = run_ranks(reference, 1, "gpt", accum, clip)
    results = run_ranks(train_offloaded, world_size, case, str(tmp_path), timeout=300)
    for rank, (losses, weights, evals, io) in enumerate(results):
        assert max_rel(losses, want_losses) <= 1e-5, f"rank {rank}: losses {losses} vs {want_losses}"
        assert max_rel(evals, want_evals) <= 1e-5, f"rank {rank}: evaluations {evals} vs {want_evals}"
        for key, w in want_weights.items():
            assert rel(weights[key].float(), w) <= 1e-5, f"rank {rank}: {key} differs"
        if io:
            # every step read the state back from its files and wrote it again, within the budget
            assert io["read"] >= STEPS * io["on_disk"] // 2 and io["written"] >= STEPS * io["on_disk"] // 2, io
            assert io["peak_buffers"] <= io["budget"], io
            if options.get("offload_param"):
                assert io["prefetched"] > 0, io
    assert not list(tmp_path.glob("zero-swap-*"))

