"""Parameters reduced over a group of their own: the experts of a mixture-of-experts layer.

Data parallelism averages a gradient over every rank, because every rank holds the
same weights. An expert lives on only some ranks (its expert-data-parallel group,
the ranks holding the same experts), and its gradient on each already sums the
tokens of every rank that sent it some. So an expert's gradient is summed over its
own group and divided by the whole data-parallel world, exactly what one process
holding every expert would compute; its optimizer state is sharded over that group.

A parameter is an expert when it carries DeepSpeed's marks: ``allreduce = False``
and ``group_name``, the name under which the optimizer is given its group.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

import zero_kernels as zk
from zero_comm import Communicator

__all__ = ["ReduceGroup", "split_by_reduce_group"]

ReduceGroup = tuple[list[torch.nn.Parameter], Communicator, float]  # parameters, group, gradient factor


def split_by_reduce_group(
    params: list[torch.nn.Parameter],
    comm: Communicator,
    expert_comms: Mapping[str, Communicator],
    names: Mapping[torch.nn.Parameter, str],
    lamb: bool,
) -> list[ReduceGroup]:
    """``params`` as runs reduced over one group each: the dense ones over ``comm``, then each expert
    group's over its communicator (in name order, the same on every rank). The factor turns the
    group's average into the average over ``comm``'s ranks."""
    dense: list[torch.nn.Parameter] = []
    experts: dict[str, list[torch.nn.Parameter]] = {}
    for p in params:
        if getattr(p, "allreduce", True) is not False:
            dense.append(p)
            continue
        group = getattr(p, "group_name", None)
        if group not in expert_comms:
            name = names.get(p, f"of shape {tuple(p.shape)}")
            raise ValueError(
                f"parameter {name} is an expert (allreduce=False) of group {group!r}, but the "
                f"optimizer was given no communicator for it (expert_comms has {sorted(expert_comms)})"
            )
        experts.setdefault(str(group), []).append(p)
    if experts and lamb:
        raise ValueError(
            "LAMB's trust ratios need whole-parameter norms over the same parameters on every rank; "
            "with mixture-of-experts parameters use Adam, AdamW, Lion or SGD"
        )
    out: list[ReduceGroup] = [(dense, comm, 1.0)] if dense else []
    for group in sorted(experts):
        sub = expert_comms[group]
        if comm.world_size % sub.world_size:
            raise ValueError(
                f"expert group {group!r} has {sub.world_size} ranks, which does not divide the "
                f"data-parallel world of {comm.world_size}"
            )
        out.append((experts[group], sub, sub.world_size / comm.world_size))
    return out


def sums_over_copies(runs: list[tuple[list[torch.Tensor], int]]) -> torch.Tensor:
    """``[sum of squares, non-finite flag]`` of gradients held whole by several ranks each (stage 0),
    each run ``(gradients, ranks holding them)`` divided by its number of copies: summed over every
    rank, that is the whole model's, however the experts are spread."""
    sumsq = torch.zeros((), dtype=torch.float32)
    nonfinite = torch.zeros((), dtype=torch.bool)
    for grads, copies in runs:
        s, f = zk.grad_norm_sq(grads)
        sumsq, nonfinite = sumsq + s.cpu() / copies, nonfinite | f.cpu()
    return torch.stack([sumsq, nonfinite.float()])
