"""deepspeed.zero.Init builds a model no rank holds whole; GatheredParameters makes it whole for a block
(and keeps one rank's changes); a model built under zero.Init trains at stage 3 exactly like plain torch."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zero_all as deepspeed
import zero_optim
from zero_comm.testing import run_ranks

STEPS, MICRO, LR = 4, 4, 1e-2
STAGE3 = {"train_micro_batch_size_per_gpu": MICRO, "zero_optimization": {"stage": 3, "reduce_bucket_size": 500,
                                                                         "stage3_param_persistence_threshold": 10},
          "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.01}}}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh())
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.head(self.body(x)), y)


def data(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(MICRO * world, 8, generator=torch.Generator().manual_seed(step))
    rows = x[rank * MICRO:(rank + 1) * MICRO]
    return rows, rows[:, :4].argmax(1)


def plain_torch(world: int) -> list[float]:
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    losses = []
    for step in range(STEPS):
        x, y = (torch.cat(t) for t in zip(*(data(step, r, world) for r in range(world))))
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def zero_init_script() -> list[float]:
    """A DeepSpeed ZeRO-3 script: build under zero.Init, initialize, train."""
    torch.manual_seed(1 + deepspeed.comm.get_rank())  # rank 0's initial weights are everyone's
    if deepspeed.comm.get_rank() == 0:
        torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=STAGE3):
        model = Net()
    assert all(isinstance(p, zero_optim.PartitionedParameter) for p in model.parameters())
    engine, _, _, _ = deepspeed.initialize(model=model, config=STAGE3)
    rank, world = deepspeed.comm.get_rank(), deepspeed.comm.get_world_size()
    losses = []
    for step in range(STEPS):
        loss = engine(*data(step, rank, world))
        engine.backward(loss)
        engine.step()
        deepspeed.comm.all_reduce(loss := loss.detach().clone(), deepspeed.comm.ReduceOp.AVG)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("world", [1, 2])
def test_a_model_built_under_zero_init_trains_like_plain_torch(world: int):
    want = plain_torch(world)
    for got in run_ranks(zero_init_script, world):
        err = max(abs(a - b) / abs(b) for a, b in zip(got, want, strict=True))
        assert err <= 1e-5, f"{got} vs {want}"


def partition_and_gather() -> dict:
    rank = deepspeed.comm.get_rank()
    torch.manual_seed(rank)  # different on each rank: zero.Init must still agree on rank 0's weights
    with deepspeed.zero.Init():
        layer = nn.Linear(10, 7)
    held = layer.weight.zero.stop - layer.weight.zero.start
    with pytest.raises(zero_optim.PartitionedParameterError, match="partitioned"):
        layer.weight.sum()
    with deepspeed.zero.GatheredParameters(layer.parameters()):
        first = layer.weight.detach().clone()
        layer.weight.data.fill_(5.0)  # no modifier_rank: dropped
    with deepspeed.zero.GatheredParameters(layer.weight, modifier_rank=1):
        assert torch.equal(layer.weight, first)
        layer.weight.data.fill_(float(rank))  # rank 1's value is kept
    with deepspeed.zero.GatheredParameters([layer.weight]):
        after = layer.weight.detach().clone()
    built = nn.Linear(3, 3)
    deepspeed.zero.Init(module=built)
    return {"held": held, "first": first, "after": after,
            "module": all(isinstance(p, zero_optim.PartitionedParameter) for p in built.parameters())}


def test_parameters_are_partitioned_and_gathered_on_demand():
    results = run_ranks(partition_and_gather, 2)
    assert [r["held"] for r in results] == [35, 35]  # 70 weights over 2 ranks
    assert torch.equal(results[0]["first"], results[1]["first"])
    torch.manual_seed(0)
    assert torch.equal(results[0]["first"], nn.Linear(10, 7).weight.detach())  # rank 0's init
    for r in results:
        assert torch.equal(r["after"], torch.ones(7, 10)) and r["module"]


def test_disabled_init_and_plain_parameters_pass_through():
    with deepspeed.zero.Init(enabled=False):
        layer = nn.Linear(2, 2)
    assert not isinstance(layer.weight, zero_optim.PartitionedParameter)
    with deepspeed.zero.GatheredParameters(layer.weight, modifier_rank=0):
        layer.weight.data.fill_(1.0)
    assert torch.equal(layer.weight, torch.ones(2, 2))


def test_what_zero_init_cannot_honour_is_refused():
    with pytest.raises(deepspeed.ConfigError, match=r"zero_optimization\.stage: zero\.Init .* stage 1"):
        deepspeed.zero.Init(config_dict_or_path={**STAGE3, "zero_optimization": {"stage": 1}})
    with pytest.raises(deepspeed.ConfigError, match=r"remote_device='nvme'.*offload_param"):
        deepspeed.zero.Init(remote_device="nvme")
    with pytest.raises(ValueError, match=r"pin_memory=True\) needs remote_device"):
        deepspeed.zero.Init(pin_memory=True)
    with pytest.raises(NotImplementedError, match="zero_quantized_weights"):
        deepspeed.zero.Init(zero_quantized_weights=True)
    with pytest.raises(NotImplementedError, match="param_swapper"):
        deepspeed.zero.Init(param_swapper=object())
    with pytest.raises(ValueError, match="dtype"):
        deepspeed.zero.Init(dtype=torch.int8)
    with deepspeed.zero.Init():
        model = Net()
    stage2 = {**STAGE3, "zero_optimization": {"stage": 2}}
    with pytest.raises(deepspeed.ConfigError, match=r"built under zero\.Init.*needs stage 3"):
        deepspeed.initialize(model=model, config=stage2)
