"""fp16 dynamic loss scaling with DeepSpeed's semantics: an overflow on any one rank skips
the step on every rank, hysteresis delays the cut, and the scale recovers after a window."""

import math

import pytest
import torch
import zero_models

import zero_comm
from zero_comm.testing import run_ranks
from zero_optim import AdamW, DynamicLossScaler, LossScaleConfig, ZeroConfig, ZeroOptimizer


def test_scaler_follows_deepspeed_rules():
    s = DynamicLossScaler(LossScaleConfig(initial_scale_power=8, window=3, hysteresis=2))
    seen = []
    for overflow in [False, True, True, False, False, False, False, True]:
        s.update(overflow)
        seen.append(s.scale)
    # first overflow spends hysteresis; the second halves; three clean steps double it back
    # (and restore hysteresis, so the next single overflow is absorbed again)
    assert seen == [256, 256, 128, 128, 128, 256, 256, 256]
    floor = DynamicLossScaler(LossScaleConfig(initial_scale_power=1, hysteresis=1, min_scale=1))
    for _ in range(5):
        floor.update(True)
    assert floor.scale == 1.0


def overflow_on_one_rank(stage: int) -> dict:
    comm = zero_comm.init_distributed()
    model = zero_models.make_model("mlp")
    config = ZeroConfig(stage=stage, precision="fp16", bucket_numel=2_000,
                        loss_scale=LossScaleConfig(initial_scale_power=8, window=3, hysteresis=2))
    opt = ZeroOptimizer(model.parameters(), AdamW(lr=1e-3), comm=comm, config=config)
    poison = {"on": False}
    last = model.net[4].weight  # a parameter whose reduced gradient lands on one rank's shard only

    def hook(grad: torch.Tensor) -> torch.Tensor:
        if poison["on"] and comm.rank == comm.world_size - 1:
            grad = grad.clone()
            grad.view(-1)[0] = math.inf
        return grad

    last.register_hook(hook)
    record = {"stepped": [], "scale": [], "changed": []}
    for step in range(8):
        poison["on"] = step in (1, 2)
        before = [p.detach().clone() for p in model.parameters()]
        x, y = zero_models.batch("mlp", step, 8)
        opt.backward(model(x, y))
        record["stepped"].append(opt.step())
        record["scale"].append(opt.scaler.scale)
        record["changed"].append(any(not torch.equal(b, p) for b, p in zip(before, model.parameters())))
    return record


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_an_overflow_on_one_rank_skips_the_step_everywhere(stage):
    records = run_ranks(overflow_on_one_rank, 2, stage)
    for rank, r in enumerate(records):
        assert r["stepped"] == [True, False, False, True, True, True, True, True], (rank, r)
        assert r["changed"] == r["stepped"], f"rank {rank}: weights moved on a skipped step"
        assert r["scale"] == [256, 256, 128, 128, 128, 256, 256, 256], (rank, r["scale"])
