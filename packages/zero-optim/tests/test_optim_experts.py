"""Mixture-of-experts parameters (marked allreduce=False with a group_name) are reduced over the ranks holding the
same expert and averaged over the whole data-parallel world, at stages 0, 1 and 2: the step, the gradient norm
and the clipping equal what one process holding every expert computes. Missing groups and LAMB are refused."""

import math

import pytest
import torch
from torch import nn

import zero_comm
from zero_comm.testing import run_ranks
from zero_optim import LAMB, SGD, ZeroConfig, ZeroOptimizer

EXPERT = 5


def inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(rank)
    return torch.randn(2, 4, generator=gen), torch.randn(EXPERT, generator=gen)


def expert_start(ep_rank: int) -> torch.Tensor:
    return torch.arange(EXPERT, dtype=torch.float32) + 10 * ep_rank


def reference(world: int, ep_size: int, clip: float) -> tuple[list[torch.Tensor], torch.Tensor, float]:
    """Every expert's new value, the dense weight's, and the gradient norm, from one process."""
    torch.manual_seed(0)
    dense = nn.Linear(4, 3)
    dense_grad = sum(torch.autograd.grad(dense(inputs(r)[0]).sum(), dense.weight)[0] for r in range(world)) / world
    expert_grads = [sum(inputs(r)[1] for r in range(world) if r % ep_size == e) / world for e in range(ep_size)]
    bias_grad = torch.full((3,), 2.0)  # d sum / d bias: two rows, averaged over the ranks
    norm = math.sqrt(
        float(dense_grad.square().sum() + bias_grad.square().sum() + sum(g.square().sum() for g in expert_grads))
    )
    scale = min(1.0, clip / (norm + 1e-6))
    experts = [expert_start(e) - scale * g for e, g in enumerate(expert_grads)]
    return experts, dense.weight.detach() - scale * dense_grad, norm


def train(ep_size: int, stage: int, clip: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    world = zero_comm.init_distributed()
    groups = zero_comm.build_expert_groups(ep_size)
    torch.manual_seed(0)
    dense = nn.Linear(4, 3)
    expert = nn.Parameter(expert_start(groups.expert.rank))
    expert.allreduce = False  # DeepSpeed's marks
    expert.group_name = f"ep_size_{ep_size}"
    params = [("dense.weight", dense.weight), ("dense.bias", dense.bias), (f"experts.{groups.expert.rank}", expert)]
    opt = ZeroOptimizer(
        params,
        SGD(lr=1.0, momentum=0.0),
        comm=world,
        config=ZeroConfig(stage=stage, clip_grad_norm=clip, align=1),
        expert_comms={f"ep_size_{ep_size}": groups.expert_data},
    )
    x, y = inputs(world.rank)
    opt.backward(dense(x).sum() + (expert * y).sum())
    assert opt.step()
    assert opt.last_grad_norm is not None
    return expert.detach().clone(), dense.weight.detach().clone(), opt.last_grad_norm


def all_stages(ep_size: int, clip: float) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    return [train(ep_size, stage, clip) for stage in (0, 1, 2)]


@pytest.mark.parametrize("world,ep_size", [(2, 2), (4, 2), (4, 4), (2, 1)])
def test_experts_step_as_one_process_holding_them_all(world: int, ep_size: int) -> None:
    clip = 0.5
    experts, dense, norm = reference(world, ep_size, clip)
    for rank, stages in enumerate(run_ranks(all_stages, world, ep_size, clip)):
        for stage, (expert, weight, got_norm) in enumerate(stages):
            where = f"rank {rank} stage {stage}"
            torch.testing.assert_close(expert, experts[rank % ep_size], msg=where)
            torch.testing.assert_close(weight, dense, msg=where)
            assert got_norm == pytest.approx(norm, rel=1e-5), where


def refusals() -> list[str]:
    comm = zero_comm.init_distributed()
    p = nn.Parameter(torch.zeros(3))
    p.allreduce, p.group_name = False, "ep_size_2"
    out = []
    for rule, comms in ((SGD(), {}), (LAMB(), {"ep_size_2": comm})):
        with pytest.raises(ValueError) as info:
            ZeroOptimizer([("experts.0.w", p)], rule, comm=comm, config=ZeroConfig(stage=1), expert_comms=comms)
        out.append(str(info.value))
    return out


def test_an_expert_without_its_group_and_lamb_with_experts_are_refused() -> None:
    missing, lamb = run_ranks(refusals, 1)[0]
    assert missing == (
        "parameter experts.0.w is an expert (allreduce=False) of group 'ep_size_2', but the optimizer "
        "was given no communicator for it (expert_comms has [])"
    )
    assert lamb.startswith("LAMB's trust ratios need whole-parameter norms")
