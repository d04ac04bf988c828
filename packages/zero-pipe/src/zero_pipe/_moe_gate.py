"""Top-1 and top-2 gating for a mixture of experts (GShard / Switch routing), with capacity.

A gate scores each token against every expert (a linear layer, in fp32, then a
softmax) and routes it to its best one (top-1) or two (top-2). Each expert takes at
most ``capacity`` tokens per step: ``ceil(tokens / experts * capacity_factor)``
(twice the factor for top-2), at least ``min_capacity``. With ``drop_tokens`` the
tokens past an expert's capacity are dropped (their output is zero, the residual
path carries them): the first ones in sequence order are kept, or, with
``use_rts`` (random token selection, top-1), a uniformly random choice of them.
Without it the capacity is the largest load of any expert on any rank of the
expert group, so nothing is dropped and the ranks' all-to-all blocks still match.

The load-balancing loss is ``experts * sum_e(mean gate prob of e * fraction of
tokens whose first choice is e)``: 1 when routing is uniform, larger when it is not.

The result is a :class:`Routing`: ``combine[s, e, c]`` is the weight with which
token ``s``'s output from slot ``c`` of expert ``e`` enters its output (its gate
probability; for top-2 the pair renormalised to sum to one), ``dispatch`` says which
slots hold which token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from zero_comm import Communicator

__all__ = [
    "NOISY_GATE_POLICIES",
    "GateConfig",
    "Routing",
    "TopKGate",
    "expert_capacity",
    "top1_routing",
    "top2_routing",
]

NOISY_GATE_POLICIES = (None, "Jitter", "RSample")


class Routing(NamedTuple):
    l_aux: torch.Tensor  # the load-balancing loss, a scalar
    combine: torch.Tensor  # [tokens, experts, capacity], fp32
    dispatch: torch.Tensor  # [tokens, experts, capacity], bool
    exp_counts: torch.Tensor  # [experts]: tokens that chose each expert, before dropping


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float, min_capacity: int) -> int:
    """Slots per expert: ``ceil(tokens / experts * capacity_factor)``, at least ``min_capacity``."""
    return max(math.ceil(num_tokens / num_experts * capacity_factor), min_capacity)


def _gumbel(like: torch.Tensor) -> torch.Tensor:
    uniform = torch.rand_like(like).clamp_(torch.finfo(like.dtype).tiny, 1.0)
    return -torch.log(-torch.log(uniform))


def _largest_load(counts: torch.Tensor, comm: Communicator | None) -> int:
    """The capacity that drops nothing: the largest number of tokens any expert got on any rank."""
    top = counts.max().reshape(1).to(torch.int64)
    if comm is not None and comm.world_size > 1:
        comm.all_reduce(top, "max")
    return max(int(top.item()), 1)


def _balance_loss(gates: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    experts = gates.shape[1]
    return (gates.mean(0) * first.float().mean(0)).sum() * experts


def _slot_weights(weight: torch.Tensor, mask: torch.Tensor, slot: torch.Tensor, capacity: int) -> torch.Tensor:
    """[tokens, experts, capacity]: ``weight[s]`` at (expert chosen by ``mask[s]``, ``slot[s]``)."""
    in_slot = F.one_hot(slot.clamp(min=0), capacity).to(weight.dtype)
    return (weight[:, None] * mask.to(weight.dtype))[:, :, None] * in_slot[:, None, :]


def top1_routing(
    logits: torch.Tensor,
    *,
    capacity_factor: float = 1.0,
    min_capacity: int = 4,
    drop_tokens: bool = True,
    use_rts: bool = True,
    rsample: bool = False,
    used_token: torch.Tensor | None = None,
    comm: Communicator | None = None,
) -> Routing:
    """Route each token (a row of ``logits``, ``[tokens, experts]``) to its best expert.

    ``rsample`` picks the expert from logits with Gumbel noise (the gate weight stays
    the noiseless probability); ``used_token`` (0/1 per token) leaves the zeros unrouted;
    ``comm`` is the expert-parallel group, over which ``drop_tokens=False`` agrees a capacity.
    """
    tokens, experts = logits.shape
    gates = F.softmax(logits, dim=1)
    choice = torch.argmax(logits + _gumbel(logits) if rsample else gates, dim=1)
    mask = F.one_hot(choice, experts)
    if used_token is not None:
        mask = mask * used_token.reshape(-1, 1).to(mask.dtype)
    counts = mask.sum(0)
    l_aux = _balance_loss(gates, mask)
    if drop_tokens:
        capacity = expert_capacity(tokens, experts, capacity_factor, min_capacity)
        if use_rts:  # keep a random `capacity` of each expert's tokens
            priority = mask * torch.rand(mask.shape, device=mask.device)
            keep = torch.zeros_like(mask).scatter_(0, priority.topk(min(capacity, tokens), dim=0).indices, 1)
            mask = mask * keep
        else:  # keep the first `capacity`, in sequence order
            mask = mask * (torch.cumsum(mask, 0) <= capacity)
    else:
        capacity = _largest_load(counts, comm)
    slot = ((torch.cumsum(mask, 0) - 1) * mask).sum(1)
    weight = (gates * mask).sum(1)
    combine = _slot_weights(weight, mask, slot, capacity)
    return Routing(l_aux, combine, combine.ne(0), counts.detach())


def top2_routing(
    logits: torch.Tensor,
    *,
    capacity_factor: float = 1.0,
    min_capacity: int = 4,
    drop_tokens: bool = True,
    second_expert_sampling: bool = False,
    used_token: torch.Tensor | None = None,
    comm: Communicator | None = None,
) -> Routing:
    """Route each token to its best two experts, weights renormalised over the pair.

    Every first choice is queued before any second choice, so dropping (capacity is
    ``2 * capacity_factor`` tokens per expert and token) falls on second choices first.
    ``second_expert_sampling`` picks the second expert from logits with Gumbel noise.
    """
    tokens, experts = logits.shape
    gates = F.softmax(logits, dim=1)
    mask1 = F.one_hot(torch.argmax(gates, dim=1), experts)
    second = logits + _gumbel(logits) if second_expert_sampling else logits
    mask2 = F.one_hot(torch.argmax(second.masked_fill(mask1.bool(), float("-inf")), dim=1), experts)
    if used_token is not None:
        used = used_token.reshape(-1, 1).to(mask1.dtype)
        mask1, mask2 = mask1 * used, mask2 * used
    counts = (mask1 + mask2).sum(0)
    l_aux = _balance_loss(gates, mask1)
    queue1 = torch.cumsum(mask1, 0) - 1
    queue2 = torch.cumsum(mask2, 0) - 1 + mask1.sum(0, keepdim=True)
    if drop_tokens:
        capacity = expert_capacity(tokens, experts, 2 * capacity_factor, min_capacity)
        mask1, mask2 = mask1 * (queue1 < capacity), mask2 * (queue2 < capacity)
    else:
        capacity = _largest_load(counts, comm)
    weight1, weight2 = (gates * mask1).sum(1), (gates * mask2).sum(1)
    total = (weight1 + weight2).clamp(min=torch.finfo(gates.dtype).eps)
    combine = _slot_weights(weight1 / total, mask1, (queue1 * mask1).sum(1), capacity) + _slot_weights(
        weight2 / total, mask2, (queue2 * mask2).sum(1), capacity
    )
    return Routing(l_aux, combine, combine.ne(0), counts.detach())


@dataclass(frozen=True, kw_only=True)
class GateConfig:
    """How a :class:`TopKGate` routes.

    Args:
        k: 1 or 2 experts per token.
        capacity_factor, eval_capacity_factor: capacity in training and in eval mode.
        min_capacity: the least capacity of an expert, however few the tokens.
        noisy_gate_policy: ``None``; ``"Jitter"`` multiplies the gate's input by noise in
            ``[0.99, 1.01]`` in training; ``"RSample"`` (top-1) picks experts from
            Gumbel-noised logits in training.
        drop_tokens, use_rts, second_expert_sampling: see :func:`top1_routing` and
            :func:`top2_routing` (random choices are made in training only).
    """

    k: int = 1
    capacity_factor: float = 1.0
    eval_capacity_factor: float = 1.0
    min_capacity: int = 4
    noisy_gate_policy: str | None = None
    drop_tokens: bool = True
    use_rts: bool = True
    second_expert_sampling: bool = False

    def __post_init__(self) -> None:
        if self.k not in (1, 2):
            raise ValueError(f"top-k gating supports k=1 or k=2, got k={self.k!r}")
        if self.noisy_gate_policy not in NOISY_GATE_POLICIES:
            raise ValueError(f"noisy_gate_policy must be one of {NOISY_GATE_POLICIES}, got {self.noisy_gate_policy!r}")
        if self.noisy_gate_policy == "RSample" and self.k == 2:
            raise ValueError(
                "noisy_gate_policy='RSample' is for top-1 gating; top-2 samples its second expert "
                "with second_expert_sampling"
            )
        for name in ("capacity_factor", "eval_capacity_factor"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.min_capacity < 0:
            raise ValueError(f"min_capacity must be >= 0, got {self.min_capacity!r}")


class TopKGate(nn.Module):
    """The gate of a mixture-of-experts layer: ``wg`` (hidden -> experts, no bias) and the routing
    ``config`` says; ``comm`` is the expert-parallel group (it agrees a capacity when nothing is dropped)."""

    def __init__(
        self, hidden_size: int, num_experts: int, config: GateConfig | None = None, *, comm: Communicator | None = None
    ):
        super().__init__()
        self.wg = nn.Linear(hidden_size, num_experts, bias=False)
        self.config, self.comm = config or GateConfig(), comm

    def forward(self, x: torch.Tensor, used_token: torch.Tensor | None = None) -> Routing:
        """Route ``x`` (``[tokens, hidden]``)."""
        c, train = self.config, self.training
        x = x.float()
        if c.noisy_gate_policy == "Jitter" and train:
            x = x * torch.empty_like(x).uniform_(0.99, 1.01)
        logits = F.linear(x, self.wg.weight.float())
        factor = c.capacity_factor if train else c.eval_capacity_factor
        if c.k == 1:
            return top1_routing(
                logits,
                capacity_factor=factor,
                min_capacity=c.min_capacity,
                drop_tokens=c.drop_tokens,
                use_rts=c.use_rts and train,
                rsample=c.noisy_gate_policy == "RSample" and train,
                used_token=used_token,
                comm=self.comm,
            )
        return top2_routing(
            logits,
            capacity_factor=factor,
            min_capacity=c.min_capacity,
            drop_tokens=c.drop_tokens,
            second_expert_sampling=c.second_expert_sampling and train,
            used_token=used_token,
            comm=self.comm,
        )
