"""Rank functions that feed a pipeline bad input; each is expected to fail on every rank."""

from __future__ import annotations

import tiny_gpt

import zero_comm
from zero_pipe import PipelineEngine, PipelineModule


def _engine(comm: zero_comm.Communicator, layers: list, micro_batches: int = 2) -> PipelineEngine:
    module = PipelineModule(layers, comm.world_size, stage_id=comm.rank, loss_fn=tiny_gpt.loss_fn,
                            partition_method="uniform", seed=tiny_gpt.SEED)
    return PipelineEngine(module, comm, micro_batches=micro_batches, schedule="1f1b")


def indivisible_batch() -> None:
    comm = zero_comm.init_distributed()
    engine = _engine(comm, tiny_gpt.layers(2), micro_batches=4)
    x, y = tiny_gpt.batches(1, size=6)[0]
    engine.train_batch(batch=(x, y))


def changed_shape() -> None:
    """The second batch has shorter sequences: the middle stage receives an activation of another shape."""
    comm = zero_comm.init_distributed()
    engine = _engine(comm, tiny_gpt.layers(2))
    x, y = tiny_gpt.batches(1, size=4)[0]
    engine.train_batch(batch=(x, y))
    engine.train_batch(batch=(x[:, :6], y[:, :6]))


def wrong_dtype() -> None:
    """Stage 0 ends in a layer that casts to float64; stage 1's float32 layers cannot take it."""
    comm = zero_comm.init_distributed()
    layers = tiny_gpt.layers(2, tied=False)
    layers.insert(2, lambda x: x.double())  # the end of stage 0 under a uniform cut of 6 layers
    engine = _engine(comm, layers)
    engine.train_batch(batch=tiny_gpt.batches(1, size=4)[0])


def _boom(x):
    raise ValueError("boom: this layer always fails")


def failing_middle_stage() -> None:
    """Four stages; stage 2 fails in its first forward. Stage 0 is then waiting on stage 1, which must pass
    the abort on."""
    comm = zero_comm.init_distributed()
    layers = tiny_gpt.layers(3, tied=False)  # 6 layers; with the failure as layer 4, stage 2 holds 3-4
    layers.insert(4, _boom)
    module = PipelineModule(layers, comm.world_size, stage_id=comm.rank, loss_fn=tiny_gpt.loss_fn,
                            partition_method="uniform", seed=tiny_gpt.SEED)
    assert module.stage_of_layer(4) == 2, module.boundaries
    engine = PipelineEngine(module, comm, micro_batches=4, schedule="1f1b")
    engine.train_batch(batch=tiny_gpt.batches(1, size=4)[0])


def changed_shape_allowed() -> list[float]:
    """With dynamic_shapes=True the same change is fine: shapes travel in each message's header."""
    comm = zero_comm.init_distributed()
    module = PipelineModule(tiny_gpt.layers(2), comm.world_size, stage_id=comm.rank, loss_fn=tiny_gpt.loss_fn,
                            partition_method="uniform", seed=tiny_gpt.SEED)
    engine = PipelineEngine(module, comm, micro_batches=2, schedule="gpipe", dynamic_shapes=True)
    x, y = tiny_gpt.batches(1, size=4)[0]
    return [engine.eval_batch(batch=(x, y)), engine.eval_batch(batch=(x[:, :6], y[:, :6]))]


def construction_errors() -> list[str]:
    """Engine arguments that cannot work, on a one-stage pipeline: the messages they raise."""
    comm = zero_comm.init_distributed()
    cases = [dict(schedule="zb-h1", interval=1), dict(schedule="interleaved", interval=0),
             dict(schedule="1f1b", interval=0, micro_batches=0)]
    out = []
    for case in cases:
        module = PipelineModule(tiny_gpt.layers(1), 1, stage_id=0, loss_fn=tiny_gpt.loss_fn,
                                activation_checkpoint_interval=case["interval"])
        try:
            PipelineEngine(module, comm, micro_batches=case.get("micro_batches", 2), schedule=case["schedule"])
        except ValueError as exc:
            out.append(str(exc))
    return out
