"""deepspeed.moe.layer.MoE through the engine: a model with a mixture-of-experts layer, its experts spread over
2 or 4 ranks (expert groups of 2 or 4) and trained at ZeRO stage 1 or 2, gives the losses of one process holding
every expert (fp32, 10 steps, within 1e-4), and a checkpoint saved mid-run (each rank its own experts) resumes
to the same losses. Stage 3 is refused by name."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zero_all
import zero_comm
import zero_pipe
from zero_comm.testing import run_ranks

HIDDEN, EXPERTS, STEPS, SAVE_AT = 8, 4, 10, 5


class Net(nn.Module):
    def __init__(self, moe: nn.Module):
        super().__init__()
        self.inp, self.moe, self.out = nn.Linear(HIDDEN, HIDDEN), moe, nn.Linear(HIDDEN, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        m, l_aux, _ = self.moe(h)
        return F.mse_loss(self.out(h + m), y) + 0.01 * l_aux


def build(k: int, ep_size: int | None) -> Net:
    """The same dense weights and gate everywhere; expert ``i``'s weights depend on ``i`` alone."""
    torch.manual_seed(0)
    inp = nn.Linear(HIDDEN, HIDDEN)
    expert = nn.Sequential(nn.Linear(HIDDEN, 16), nn.ReLU(), nn.Linear(16, HIDDEN))
    gate = {"k": k, "capacity_factor": 1.0, "min_capacity": 0, "use_rts": False}
    if ep_size is None:  # the reference: every expert in this process
        moe: zero_pipe.MoELayer = zero_pipe.MoELayer(HIDDEN, expert, EXPERTS, gate=zero_pipe.GateConfig(**gate))
    else:
        moe = zero_all.moe.layer.MoE(HIDDEN, expert, EXPERTS, ep_size=ep_size, top2_2nd_expert_sampling=False, **gate)
    net = Net(moe)
    net.inp.load_state_dict(inp.state_dict())
    with torch.no_grad():
        for gid, module in moe.experts.items():
            gen = torch.Generator().manual_seed(100 + int(gid))
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return net


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(2, 8, HIDDEN, generator=gen), torch.randn(2, 8, 1, generator=gen)


def config(stage: int, world: int) -> dict:
    return {
        "train_batch_size": 2 * world,
        "train_micro_batch_size_per_gpu": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
        "zero_optimization": {"stage": stage},
    }


def reference(k: int, world: int) -> list[float]:
    net = build(k, None)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.01)
    losses = []
    for step in range(STEPS):
        loss = sum(net(*batch(step, r)) for r in range(world)) / world  # each rank's tokens routed on their own
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def run(engine: zero_all.Engine, comm: zero_comm.Communicator, steps: range) -> list[float]:
    losses = []
    for step in steps:
        loss = engine(*batch(step, comm.rank))
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone().reshape(1)
        comm.all_reduce(mean, "avg")
        losses.append(mean.item())
    return losses


def train(k: int, ep_size: int, stage: int, save_dir: str) -> tuple[list[float], list[float], str]:
    comm = zero_comm.init_distributed()
    engine, *_ = zero_all.initialize(model=build(k, ep_size), config=config(stage, comm.world_size))
    losses = run(engine, comm, range(SAVE_AT))
    engine.save_checkpoint(save_dir, tag="mid")
    losses += run(engine, comm, range(SAVE_AT, STEPS))
    resumed, *_ = zero_all.initialize(model=build(k, ep_size), config=config(stage, comm.world_size))
    path, _ = resumed.load_checkpoint(save_dir, tag="mid")
    assert path is not None
    after = run(resumed, comm, range(SAVE_AT, STEPS))
    with pytest.raises(zero_all.ConfigError) as refused:
        zero_all.initialize(model=build(k, ep_size), config=config(3, comm.world_size))
    return losses, after, str(refused.value)


@pytest.mark.parametrize("world,ep_size,stage,k", [(2, 2, 1, 1), (2, 2, 2, 2), (4, 2, 2, 1), (4, 4, 1, 2)])
def test_expert_parallel_training_matches_one_process_and_resumes(
    world: int, ep_size: int, stage: int, k: int, tmp_path
) -> None:
    want = reference(k, world)
    for rank, (losses, after, refused) in enumerate(
        run_ranks(train, world, k, ep_size, stage, str(tmp_path), timeout=300)
    ):
        assert losses == pytest.approx(want, rel=1e-4, abs=1e-6), f"rank {rank}"
        assert after == pytest.approx(losses[SAVE_AT:], rel=1e-6, abs=1e-7), f"rank {rank}: resumed run"
        assert refused.startswith("zero_optimization.stage: 3 partitions every parameter over all ranks")
