"""A mixture-of-experts layer with expert parallelism (GShard, DeepSpeed-MoE).

The layer's ``num_experts`` experts are spread over the ``ep_size`` ranks of an
expert-parallel group, ``num_experts / ep_size`` on each. Every rank routes its own
tokens (:class:`TopKGate`), packs them into ``[experts, capacity, hidden]`` slots,
and one all-to-all brings each expert the slots meant for it from every rank of the
group; a second all-to-all sends the outputs home, where each token's output is its
experts' outputs weighted by the gate. Both exchanges are differentiable, so an
expert's gradient holds the contributions of every rank that sent it tokens.

Experts are named by their global index (``experts.5.weight`` on whichever rank
holds expert 5), so ranks never share a name for different weights, and a
checkpoint of the experts is one set of names however they are spread. Their
parameters are marked ``allreduce = False`` with a ``group_name`` (DeepSpeed's
marks): a data-parallel optimizer must reduce them over the ranks holding the same
experts (the expert-data-parallel group, :attr:`MoELayer.data_comm`), not over all.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from zero_comm import Communicator

from ._a2a import all_to_all
from ._moe_gate import GateConfig, TopKGate

__all__ = ["Experts", "MoELayer", "every_expert_name", "expert_data_comms", "is_expert_param"]


def is_expert_param(p: torch.Tensor) -> bool:
    """Whether ``p`` belongs to an expert (reduced over its expert-data-parallel group, not all ranks)."""
    return getattr(p, "allreduce", True) is False


class Experts(nn.ModuleDict):
    """This rank's experts: copies of ``expert`` under their global indexes ``ids``."""

    def __init__(self, expert: nn.Module, ids: range, group_name: str):
        super().__init__({str(i): copy.deepcopy(expert) for i in ids})
        for p in self.parameters():
            p.allreduce = False  # type: ignore[attr-defined]
            p.group_name = group_name  # type: ignore[attr-defined]


class MoELayer(nn.Module):
    """``forward(x) -> (output, l_aux, exp_counts)``: ``x`` (``[..., hidden]``) through the experts.

    Args:
        expert: the module copied into each expert; it maps ``[tokens, hidden]`` to
            ``[tokens, hidden]``.
        comm: the expert-parallel group (``None``: every expert on this rank).
        data_comm: where the experts' gradients are averaged: the ranks that hold the
            same experts. Only recorded here, for the optimizer (:func:`expert_data_comms`).
        use_residual: Residual MoE (PR-MoE): a dense copy of ``expert`` runs beside the
            experts and a learned 2-way softmax mixes the two outputs per token.
        gate: how tokens are routed (:class:`GateConfig`).
    """

    def __init__(
        self,
        hidden_size: int,
        expert: nn.Module,
        num_experts: int,
        *,
        comm: Communicator | None = None,
        data_comm: Communicator | None = None,
        gate: GateConfig | None = None,
        use_residual: bool = False,
    ):
        super().__init__()
        ep = comm.world_size if comm is not None else 1
        if num_experts < 1 or num_experts % ep:
            raise ValueError(
                f"num_experts ({num_experts}) must be a positive multiple of the expert-parallel size {ep}"
            )
        self.comm, self.data_comm, self.num_experts = comm, data_comm, num_experts
        self.ep_size, self.num_local_experts = ep, num_experts // ep
        self.group_name = f"ep_size_{ep}"
        first = (comm.rank if comm is not None else 0) * self.num_local_experts
        self.gate = TopKGate(hidden_size, num_experts, gate, comm=comm)
        self.experts = Experts(expert, range(first, first + self.num_local_experts), self.group_name)
        self.use_residual = use_residual
        if use_residual:
            self.mlp = copy.deepcopy(expert)
            self.coefficient = nn.Linear(hidden_size, 2)

    def forward(
        self, hidden_states: torch.Tensor, used_token: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden = hidden_states.shape[-1]
        x = hidden_states.reshape(-1, hidden)
        routing = self.gate(x, used_token)
        slots = torch.einsum("sec,sm->ecm", routing.dispatch.to(x.dtype), x)  # [experts, capacity, hidden]
        out = self._run_experts(slots)
        y = torch.einsum("sec,ecm->sm", routing.combine.to(x.dtype), out).reshape(hidden_states.shape)
        if self.use_residual:
            mix = F.softmax(self.coefficient(hidden_states), dim=-1)
            y = y * mix[..., 0:1] + self.mlp(hidden_states) * mix[..., 1:]
        return y, routing.l_aux, routing.exp_counts

    def _run_experts(self, slots: torch.Tensor) -> torch.Tensor:
        """Slots of every expert from this rank in, their outputs back, in global expert order."""
        ep, local = self.ep_size, self.num_local_experts
        capacity, hidden = slots.shape[1:]
        if self.comm is not None and ep > 1:
            slots = all_to_all(slots, self.comm)  # now: block r holds rank r's slots for this rank's experts
        mine = slots.reshape(ep, local, capacity, hidden)
        outs = [
            expert(mine[:, j].reshape(ep * capacity, hidden)).reshape(ep, 1, capacity, -1)
            for j, expert in enumerate(self.experts.values())
        ]
        out = torch.cat(outs, dim=1).reshape(ep * local, capacity, -1)
        if self.comm is not None and ep > 1:
            out = all_to_all(out, self.comm)
        return out


def expert_data_comms(module: nn.Module, data_parallel: Communicator) -> dict[str, Communicator]:
    """Each expert group name in ``module`` with the group its experts' gradients are averaged over.

    A layer whose experts all live on each rank (``ep_size`` 1) and that names no
    ``data_comm`` uses ``data_parallel``; one spread over several ranks must name it.
    """
    out: dict[str, Communicator] = {}
    for name, layer in module.named_modules():
        if isinstance(layer, MoELayer):
            comm = layer.data_comm
            if comm is None and layer.ep_size > 1:
                raise ValueError(
                    f"MoE layer {name!r} spreads its experts over {layer.ep_size} ranks but has no "
                    "data_comm: the group of ranks holding the same experts reduces their gradients"
                )
            out.setdefault(layer.group_name, comm if comm is not None else data_parallel)
    return out


def every_expert_name(module: nn.Module) -> set[str]:
    """The parameter names of every expert of ``module``'s MoE layers, those other ranks hold included
    (a checkpoint of the whole model holds them all)."""
    out: set[str] = set()
    for path, layer in module.named_modules():
        if isinstance(layer, MoELayer):
            local = next(iter(layer.experts.values()))
            prefix = f"{path}.experts" if path else "experts"
            out.update(
                f"{prefix}.{gid}.{rel}" for gid in range(layer.num_experts) for rel, _ in local.named_parameters()
            )
    return out
