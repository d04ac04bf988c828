"""initialize(training_data=...) and engine.deepspeed_io give each data-parallel rank its own samples,
in micro-batches of train_micro_batch_size_per_gpu."""

import torch
from test_engine import Net
from torch.utils.data import TensorDataset

import zero_all as deepspeed
from zero_comm.testing import run_ranks

SAMPLES, MICRO = 24, 3


def loaders() -> dict:
    data = TensorDataset(torch.arange(SAMPLES))
    engine, _, loader, _ = deepspeed.initialize(
        model=Net(), training_data=data,
        config={"train_micro_batch_size_per_gpu": MICRO, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}})
    assert loader is engine.training_dataloader
    train = [batch[0].tolist() for batch in loader]
    loader.sampler.set_epoch(1)
    next_epoch = [i for batch in loader for i in batch[0].tolist()]
    evaluation = [i for batch in engine.deepspeed_io(data, route="eval", batch_size=4) for i in batch[0].tolist()]
    return {"train": train, "next_epoch": next_epoch, "eval": evaluation}


def test_each_rank_sees_its_own_samples():
    world = 2
    got = run_ranks(loaders, world)
    per_rank = [[i for batch in r["train"] for i in batch] for r in got]
    assert all(len(batch) == MICRO for r in got for batch in r["train"])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(SAMPLES))  # disjoint, and together the whole set
    assert per_rank[0] != sorted(per_rank[0])  # the training route shuffles ...
    assert sorted(got[0]["next_epoch"] + got[1]["next_epoch"]) == list(range(SAMPLES))
    assert got[0]["next_epoch"] != per_rank[0]  # ... differently each epoch
    assert [r["eval"] for r in got] == [list(range(rank, SAMPLES, world)) for rank in range(world)]  # in order
