"""deepspeed.sequence.layer.DistributedAttention through the engine: a small causal transformer trained on a
sequence split over 2 or 4 ranks (Ulysses: heads scattered, sequence gathered by all-to-all) gives the losses of
the same model trained on the whole sequence in one process (fp32, 10 steps, within 1e-4; SGD with momentum, as
Adam would magnify the split sequence's different summation order in near-zero gradients)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zero_all
import zero_comm
from zero_comm.testing import run_ranks

HIDDEN, HEADS, SEQ, STEPS = 16, 4, 16, 10


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[batch, sequence, heads, dim] in and out."""
    out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True)
    return out.transpose(1, 2)


class Net(nn.Module):
    def __init__(self, attention: nn.Module | None):
        super().__init__()
        torch.manual_seed(0)
        self.qkv, self.proj = nn.Linear(HIDDEN, 3 * HIDDEN), nn.Linear(HIDDEN, HIDDEN)
        self.mlp = nn.Sequential(nn.Linear(HIDDEN, 32), nn.GELU(), nn.Linear(32, 1))
        self.attention = attention

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, s, 3, HEADS, HIDDEN // HEADS).unbind(2)
        attend = self.attention if self.attention is not None else causal_attention
        h = x + self.proj(attend(q, k, v).reshape(b, s, HIDDEN))
        return F.mse_loss(self.mlp(h), y)  # the mean over this rank's positions


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(2, SEQ, HIDDEN, generator=gen)
    return x, x.sum(-1, keepdim=True).cumsum(1) / SEQ  # a target that needs the earlier positions


def reference() -> list[float]:
    net = Net(None)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step in range(STEPS):
        loss = net(*batch(step))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def train(stage: int) -> list[float]:
    comm = zero_comm.init_distributed()
    attention = zero_all.sequence.layer.DistributedAttention(causal_attention, None, scatter_idx=2, gather_idx=1)
    config = {
        "train_batch_size": 2 * comm.world_size,
        "train_micro_batch_size_per_gpu": 2,
        "optimizer": {"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9}},
        "zero_optimization": {"stage": stage},
    }
    engine, *_ = zero_all.initialize(model=Net(attention), config=config)
    losses = []
    for step in range(STEPS):
        x, y = (t.chunk(comm.world_size, dim=1)[comm.rank] for t in batch(step))  # this rank's positions
        loss = engine(x, y)
        engine.backward(loss)  # the engine averages over the ranks: each holds 1/world of the positions
        engine.step()
        mean = loss.detach().reshape(1).clone()
        comm.all_reduce(mean, "avg")
        losses.append(mean.item())
    return losses


@pytest.mark.parametrize("world,stage", [(2, 1), (4, 2)])
def test_sequence_parallel_training_matches_the_whole_sequence(world: int, stage: int) -> None:
    want = reference()
    for rank, losses in enumerate(run_ranks(train, world, stage)):
        assert losses == pytest.approx(want, rel=1e-4, abs=1e-6), f"rank {rank}"


def refused() -> str:
    zero_comm.init_distributed()
    net = Net(zero_all.sequence.layer.DistributedAttention(causal_attention, None, 2, 1))
    x = torch.zeros(1, 2, HIDDEN)
    with pytest.raises(ValueError) as info:
        net.attention(*(x.reshape(1, 2, 8, 2)[:, :, :3] for _ in range(3)))
    return str(info.value)


def test_heads_not_divisible_by_the_ranks_are_refused_in_one_line() -> None:
    for message in run_ranks(refused, 2):
        assert message.startswith("sequence parallelism over 2 ranks: the query has 3 heads")
        assert "\n" not in message
