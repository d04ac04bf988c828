"""Pipeline 2 x data 2 with ZeRO-1 across the data-parallel group matches a plain single-process loop.

zero-pipe runs the pipeline; zero-optim's ZeroOptimizer (stage 1: optimizer state
split over the two data-parallel replicas of each stage) averages the gradients
and steps. The engine gets no data-parallel group: the optimizer reduces the
gradients itself. Losses and every weight must equal those of torch.optim.SGD on
the whole model and whole batches (fp32).
"""

import sys
from pathlib import Path

import pytest
import torch

import zero_comm
from zero_comm.testing import run_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "packages" / "zero-pipe" / "tests"))
import tiny_gpt

STEPS, LR, MICRO, BATCH = 3, 0.1, 4, 8


def pipe_zero1() -> tuple[list[float], dict[str, torch.Tensor]]:
    from zero_optim import SGD, ZeroConfig, ZeroOptimizer
    from zero_pipe import PipelineEngine, PipelineModule

    comm = zero_comm.init_distributed()
    mesh = zero_comm.build_mesh(zero_comm.ParallelDims(comm.world_size, pp=2, dp=2))
    module = PipelineModule(tiny_gpt.layers(2, tied=False), 2, stage_id=mesh.pp.rank, loss_fn=tiny_gpt.loss_fn,
                            seed=tiny_gpt.SEED)
    opt = ZeroOptimizer(module.named_parameters(), SGD(lr=LR, momentum=0.9), comm=mesh.dp,
                        config=ZeroConfig(stage=1))
    engine = PipelineEngine(module, mesh.pp, micro_batches=MICRO, schedule="1f1b", optimizer=opt)
    per = BATCH // mesh.dp.world_size
    mine = slice(mesh.dp.rank * per, (mesh.dp.rank + 1) * per)
    losses = []
    for x, y in tiny_gpt.batches(STEPS + 1, BATCH)[:STEPS]:
        loss = torch.tensor(engine.train_batch(batch=(x[mine], y[mine])))
        losses.append(mesh.dp.all_reduce(loss, "avg").item())
    return losses, {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_pipeline_with_zero1_across_data_parallel_matches_single_process() -> None:
    want_losses, _, want = tiny_gpt.reference_run(2, STEPS, LR, tied=False)
    for rank, (losses, weights) in enumerate(run_ranks(pipe_zero1, 4, timeout=180)):
        assert losses == pytest.approx(want_losses, rel=1e-5), rank
        for name, value in weights.items():
            torch.testing.assert_close(value, want[name], rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {name}")
