"""The distributed side of the parity tests: train the tiny GPT through a PipelineEngine on this rank."""

from __future__ import annotations

import tiny_gpt
import torch

import zero_comm
from zero_pipe import PipelineEngine, PipelineModule


def build(comm: zero_comm.Communicator, n_blocks: int, *, chunks: int = 1, tied: bool = True,
          interval: int = 0, partition: str = "parameters") -> PipelineModule:
    return PipelineModule(tiny_gpt.layers(n_blocks, tied=tied), comm.world_size, stage_id=comm.rank,
                          loss_fn=tiny_gpt.loss_fn, partition_method=partition, chunks=chunks,
                          activation_checkpoint_interval=interval, seed=tiny_gpt.SEED)


def train(module: PipelineModule, comm: zero_comm.Communicator, schedule: str, micro_batches: int, steps: int,
          lr: float = 0.1, dp_comm: zero_comm.Communicator | None = None, batch_size: int = 8,
          ) -> tuple[list[float], float, dict[str, torch.Tensor]]:
    """``steps`` train batches and one eval batch; every rank in a data-parallel group takes its slice."""
    opt = torch.optim.SGD(module.parameters(), lr=lr, momentum=0.9)
    engine = PipelineEngine(module, comm, micro_batches=micro_batches, schedule=schedule, optimizer=opt,
                            dp_comm=dp_comm)
    data = tiny_gpt.batches(steps + 1, batch_size)
    if dp_comm is not None:
        per = batch_size // dp_comm.world_size
        mine = slice(dp_comm.rank * per, (dp_comm.rank + 1) * per)
        data = [(x[mine], y[mine]) for x, y in data]
    losses = [engine.train_batch(batch=b) for b in data[:steps]]
    evaluation = engine.eval_batch(iter(zip(data[steps][0].chunk(micro_batches),
                                            data[steps][1].chunk(micro_batches))))
    return losses, evaluation, {k: v.detach().clone() for k, v in module.state_dict().items()}


def schedules_run(n_blocks: int, steps: int, cases: list[tuple[str, int]]) -> dict:
    """Every (schedule, micro_batches) case on the world as one pipeline."""
    comm = zero_comm.init_distributed()
    out = {}
    for schedule, m in cases:
        chunks = 2 if schedule == "interleaved" else 1
        out[(schedule, m)] = train(build(comm, n_blocks, chunks=chunks), comm, schedule, m, steps)
    return out


def grid_run(n_blocks: int, steps: int, schedule: str, micro_batches: int) -> tuple:
    """Pipeline 2 x data 2 on four ranks: each data-parallel replica takes half of every batch."""
    comm = zero_comm.init_distributed()
    mesh = zero_comm.build_mesh(zero_comm.ParallelDims(comm.world_size, pp=2, dp=2))
    return train(build(mesh.pp, n_blocks), mesh.pp, schedule, micro_batches, steps, dp_comm=mesh.dp)


def options_run(n_blocks: int, steps: int, tied: bool, interval: int, partition: str) -> tuple:
    """One 1F1B pipeline over the world with the given module options."""
    comm = zero_comm.init_distributed()
    module = build(comm, n_blocks, tied=tied, interval=interval, partition=partition)
    return train(module, comm, "1f1b", 4, steps)


def pipe_tp_run(n_blocks: int, steps: int) -> tuple:
    """Pipeline 2 x tensor 2 on four ranks: each stage's attention and MLP linears split over its TP pair."""
    import tp_ranks

    from zero_pipe import tensor_parallelize

    comm = zero_comm.init_distributed()
    mesh = zero_comm.build_mesh(zero_comm.ParallelDims(comm.world_size, pp=2, tp=2))
    module = build(mesh.pp, n_blocks)
    rewritten = tensor_parallelize(module, mesh.tp)
    losses, evaluation, _ = train(module, mesh.pp, "1f1b", 4, steps)
    return rewritten, losses, evaluation, tp_ranks.whole_weights(module)


def two_ties_layers() -> list:
    """Six linears over three stages; tie "a" joins stages 0 and 2, tie "b" stages 1 and 2."""
    from torch import nn

    from zero_pipe import LayerSpec, TiedLayerSpec

    return [TiedLayerSpec("a", nn.Linear, 4, 4), LayerSpec(nn.Linear, 4, 4), TiedLayerSpec("b", nn.Linear, 4, 4),
            LayerSpec(nn.Linear, 4, 4), TiedLayerSpec("b", nn.Linear, 4, 4), TiedLayerSpec("a", nn.Linear, 4, 4)]


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out - target).pow(2).mean()


def two_ties_run(x: torch.Tensor, y: torch.Tensor, schedule: str = "1f1b",
                 loss_scale: float | None = None) -> dict[str, torch.Tensor]:
    """One batch, no optimizer: the gradients each stage is left with."""
    comm = zero_comm.init_distributed()
    module = PipelineModule(two_ties_layers(), comm.world_size, stage_id=comm.rank, loss_fn=mse,
                            partition_method="uniform", seed=tiny_gpt.SEED)
    scale = None if loss_scale is None else (lambda: loss_scale)
    PipelineEngine(module, comm, micro_batches=2, schedule=schedule, loss_scale=scale).train_batch(batch=(x, y))
    return {name: p.grad.clone() for name, p in module.named_parameters()}
