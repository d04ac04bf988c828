"""``deepspeed.moe.layer.MoE``: zero-pipe's :class:`~zero_pipe.MoELayer` with DeepSpeed's arguments.

What this adds is DeepSpeed's way of finding the expert groups: from ``ep_size``
alone. The groups are made once per world and ``ep_size`` (every rank must build its
MoE layers in the same order, as in DeepSpeed) -- consecutive ranks exchange tokens,
strided ranks hold the same experts (:func:`zero_comm.build_expert_groups`) -- and the
engine reduces each layer's experts over the latter (:mod:`zero_all._engine._moe`).
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

import zero_comm
import zero_pipe

__all__ = ["MoE"]

_made: dict[int, tuple[object, zero_comm.ExpertGroups]] = {}  # ep_size -> (the world it was made in, groups)


def expert_groups(ep_size: int) -> zero_comm.ExpertGroups:
    """This rank's expert groups for ``ep_size`` in the current world, made on first use (a collective)."""
    world = zero_comm.init_distributed()
    if not isinstance(ep_size, int) or ep_size < 1 or world.world_size % ep_size:
        raise ValueError(
            f"MoE: ep_size must be a positive integer dividing the {world.world_size} ranks, got {ep_size!r}"
        )
    made = _made.get(ep_size)
    if made is None or made[0] is not dist.group.WORLD:
        made = (dist.group.WORLD, zero_comm.build_expert_groups(ep_size))
        _made[ep_size] = made
    return made[1]


class MoE(zero_pipe.MoELayer):
    """DeepSpeed's ``MoE(hidden_size, expert, num_experts=1, ep_size=1, k=1, capacity_factor=1.0,
    eval_capacity_factor=1.0, min_capacity=4, use_residual=False, noisy_gate_policy=None,
    drop_tokens=True, use_rts=True, use_tutel=False, enable_expert_tensor_parallelism=False,
    top2_2nd_expert_sampling=True)``; ``forward(hidden_states, used_token=None)`` returns
    ``(output, l_aux, exp_counts)``. ``use_tutel`` and expert tensor parallelism are refused."""

    def __init__(
        self,
        hidden_size: int,
        expert: nn.Module,
        num_experts: int = 1,
        ep_size: int = 1,
        k: int = 1,
        capacity_factor: float = 1.0,
        eval_capacity_factor: float = 1.0,
        min_capacity: int = 4,
        use_residual: bool = False,
        noisy_gate_policy: str | None = None,
        drop_tokens: bool = True,
        use_rts: bool = True,
        use_tutel: bool = False,
        enable_expert_tensor_parallelism: bool = False,
        top2_2nd_expert_sampling: bool = True,
    ):
        if use_tutel:
            raise NotImplementedError("MoE(use_tutel=True): Tutel's kernels are not part of zero; leave it False")
        if enable_expert_tensor_parallelism:
            raise NotImplementedError(
                "MoE(enable_expert_tensor_parallelism=True): experts split by tensor "
                "parallelism are not supported; leave it False"
            )
        gate = zero_pipe.GateConfig(
            k=k,
            capacity_factor=capacity_factor,
            eval_capacity_factor=eval_capacity_factor,
            min_capacity=min_capacity,
            noisy_gate_policy=noisy_gate_policy,
            drop_tokens=drop_tokens,
            use_rts=use_rts,
            second_expert_sampling=top2_2nd_expert_sampling,
        )
        groups = expert_groups(ep_size)
        super().__init__(
            hidden_size,
            expert,
            num_experts,
            comm=groups.expert,
            data_comm=groups.expert_data,
            gate=gate,
            use_residual=use_residual,
        )

    @property
    def expert_group_name(self) -> str:
        """The name the experts' parameters carry (``group_name``), DeepSpeed's ``ep_size_<n>``."""
        return self.group_name
