"""Rank functions for the tensor-parallel tests."""

from __future__ import annotations

import tiny_gpt
import torch
from torch import nn

import zero_comm
from zero_pipe import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    tensor_parallelize,
    vocab_parallel_cross_entropy,
)


def whole_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights with every tensor-parallel layer gathered back into the whole layer (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.gather())
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_tp(n_blocks: int, steps: int, lr: float) -> tuple[list[str], list[float], float, dict[str, torch.Tensor]]:
    """The untied tiny GPT with its blocks, embedding and head split over the world; SGD-momentum steps."""
    comm = zero_comm.init_distributed()
    model = tiny_gpt.Reference(n_blocks, tied=False)
    rewritten = tensor_parallelize(model.stack, comm)
    model.stack[0].tok = VocabParallelEmbedding.from_embedding(model.stack[0].tok, comm)
    model.stack[-1] = ColumnParallelLinear.from_linear(model.stack[-1], comm)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    data = tiny_gpt.batches(steps + 1)
    losses = []
    for x, y in data[:steps]:
        loss = vocab_parallel_cross_entropy(model(x), y, comm)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    with torch.no_grad():
        evaluation = vocab_parallel_cross_entropy(model(data[steps][0]), data[steps][1], comm).item()
    return rewritten, losses, evaluation, whole_weights(model)


def gathered_output(rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A gather_output column layer and a row layer fed a whole input, against the plain linear, with grads."""
    comm = zero_comm.init_distributed()
    torch.manual_seed(0)
    first, second = nn.Linear(6, 4 * comm.world_size), nn.Linear(4 * comm.world_size, 3)
    x = torch.randn(rows, 6, requires_grad=True)
    want = second(first(x)).sum()
    want.backward()
    xp = x.detach().clone().requires_grad_(True)
    col = ColumnParallelLinear.from_linear(first, comm, gather_output=True)
    row = RowParallelLinear.from_linear(second, comm, input_is_parallel=False)
    got = row(col(xp)).sum()
    got.backward()
    return torch.stack([got.detach(), want.detach()]), xp.grad, x.grad
