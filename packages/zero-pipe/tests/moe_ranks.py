"""Rank functions for the mixture-of-experts and Ulysses tests: each compares the split layer with the whole
layer computed in the same process from every rank's inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import zero_comm
from zero_pipe import GateConfig, MoELayer, UlyssesAttention

HIDDEN, TOKENS, EXPERTS = 8, 12, 4


def expert() -> nn.Module:
    return nn.Sequential(nn.Linear(HIDDEN, 16), nn.GELU(), nn.Linear(16, HIDDEN))


def distinct_experts(layer: MoELayer) -> MoELayer:
    """Give every expert its own weights, a function of its global index and of nothing else."""
    with torch.no_grad():
        for gid, module in layer.experts.items():
            gen = torch.Generator().manual_seed(100 + int(gid))
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return layer


def build(comm: zero_comm.Communicator | None, data: zero_comm.Communicator | None, **gate) -> MoELayer:
    torch.manual_seed(0)  # the gate (and a residual path) the same on every rank
    residual = gate.pop("use_residual", False)
    layer = MoELayer(
        HIDDEN, expert(), EXPERTS, comm=comm, data_comm=data, gate=GateConfig(**gate), use_residual=residual
    )
    return distinct_experts(layer)


def rank_tokens(rank: int) -> torch.Tensor:
    return torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(rank))


def grads(layer: MoELayer) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in layer.named_parameters()}


def expert_parallel_matches_whole_layer(ep_size: int, gates: list[dict]) -> list[str]:
    """Outputs, l_aux, counts and (reduced) gradients of the expert-parallel layer equal the whole layer's,
    for each of ``gates``; returns the expert parameters' names (the last layer's)."""
    world = zero_comm.init_distributed()
    groups = zero_comm.build_expert_groups(ep_size)
    return [name for gate in gates for name in _compare(world, groups, dict(gate))]


def _compare(world: zero_comm.Communicator, groups: zero_comm.ExpertGroups, gate: dict) -> list[str]:
    layer = build(groups.expert, groups.expert_data, **gate)
    x = rank_tokens(world.rank)
    out, l_aux, counts = layer(x)
    (out.square().sum() + l_aux).backward()
    got = grads(layer)
    for name, g in got.items():  # what a data-parallel optimizer does: experts over their own group
        (groups.expert_data if "experts." in name else world).all_reduce(g)

    whole = build(None, None, **gate)
    want_grads = None
    for rank in range(world.world_size):
        w_out, w_aux, w_counts = whole(rank_tokens(rank))
        whole.zero_grad()
        (w_out.square().sum() + w_aux).backward()
        step = grads(whole)
        want_grads = step if want_grads is None else {n: want_grads[n] + step[n] for n in step}
        if rank == world.rank:
            torch.testing.assert_close(out, w_out, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(l_aux, w_aux)
            assert torch.equal(counts, w_counts)
    assert want_grads is not None
    for name, g in got.items():
        torch.testing.assert_close(g, want_grads[name], rtol=1e-5, atol=1e-4, msg=name)  # sums of 4 ranks
    return sorted(n for n, p in layer.named_parameters() if getattr(p, "allreduce", True) is False)


def no_drop_capacity_is_agreed() -> int:
    """Without dropping, each rank's capacity is the group's largest load, so the blocks match."""
    world = zero_comm.init_distributed()
    groups = zero_comm.build_expert_groups(world.world_size)
    layer = build(groups.expert, groups.expert_data, drop_tokens=False, use_rts=False)
    x = rank_tokens(world.rank) * (1 + world.rank)  # ranks route differently
    routing = layer.gate(x)
    return routing.combine.shape[2]


def ulysses_matches_whole_attention(heads: int) -> list[tuple[float, float]]:
    """Attention on a sequence split over the ranks equals attention on the whole sequence, with gradients,
    in DeepSpeed's [sequence, batch, heads, dim] layout and in [batch, sequence, heads, dim]."""
    comm = zero_comm.init_distributed()
    return [_ulysses(comm, heads, layout) for layout in ("sbhd", "bshd")]


def _ulysses(comm: zero_comm.Communicator, heads: int, layout: str) -> tuple[float, float]:
    n, r = comm.world_size, comm.rank
    seq, batch, dim = 8, 2, 4
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(seq, batch, heads, dim, generator=gen) for _ in range(3))
    seq_dim = 0 if layout == "sbhd" else 1
    if layout == "bshd":
        q, k, v = (t.transpose(0, 1).contiguous() for t in (q, k, v))

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        # torch's attention wants [batch, heads, sequence, dim]
        order = (1, 2, 0, 3) if layout == "sbhd" else (0, 2, 1, 3)
        back = (2, 0, 1, 3) if layout == "sbhd" else (0, 2, 1, 3)
        out = F.scaled_dot_product_attention(*(t.permute(order) for t in (q, k, v)), is_causal=causal)
        return out.permute(back)

    whole = [t.clone().requires_grad_() for t in (q, k, v)]
    want = attention(*whole, causal=True)
    (want * want).sum().backward()
    mine = [t.chunk(n, seq_dim)[r].clone().requires_grad_() for t in (q, k, v)]
    layer = UlyssesAttention(attention, comm, scatter_idx=2, gather_idx=seq_dim)
    got = layer(*mine, causal=True)
    (got * got).sum().backward()
    torch.testing.assert_close(got, want.chunk(n, seq_dim)[r], rtol=1e-5, atol=1e-6)
    for part, full in zip(mine, whole, strict=True):
        assert part.grad is not None and full.grad is not None
        torch.testing.assert_close(part.grad, full.grad.chunk(n, seq_dim)[r], rtol=1e-5, atol=1e-6)
    return float(got.sum()), float(want.chunk(n, seq_dim)[r].sum())


def ulysses_refuses_heads(heads: int) -> str:
    comm = zero_comm.init_distributed()
    t = torch.zeros(2, 1, heads, 4)
    layer = UlyssesAttention(lambda q, k, v: q, comm)
    try:
        layer(t, t, t)
    except ValueError as exc:
        return str(exc)
    return "accepted"
