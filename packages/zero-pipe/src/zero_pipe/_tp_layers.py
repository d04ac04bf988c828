"""Tensor-parallel layers: a linear or an embedding whose weight is split over the ranks of a group.

- :class:`ColumnParallelLinear` splits the output features: each rank computes its
  slice of the output from the whole input.
- :class:`RowParallelLinear` splits the input features: each rank multiplies its
  slice of the input, and the partial outputs are summed.
- :class:`VocabParallelEmbedding` splits the vocabulary: each rank looks up the ids
  it owns, zeros the rest, and the lookups are summed.

A column layer followed by a row layer (an MLP, attention's QKV then output
projection) needs one all-reduce forward and one backward. Each layer is built from
the whole layer (``from_linear`` / ``from_embedding``: every rank keeps its slice, so
the result equals the original model) and turns back into it (``gather``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zero_comm import Communicator

from ._tp_ops import copy_to_tp, gather_from_tp, reduce_from_tp, scatter_to_tp

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding"]


def _divide(n: int, comm: Communicator, what: str) -> int:
    if n % comm.world_size:
        raise ValueError(f"{what} ({n}) is not divisible by the tensor-parallel degree {comm.world_size}")
    return n // comm.world_size


def _rows(full: torch.Tensor, comm: Communicator, blocks: int) -> torch.Tensor:
    """This rank's rows of ``full`` seen as ``blocks`` stacked blocks (3 for a fused QKV), each split evenly."""
    per_block = full.shape[0] // blocks
    size = _divide(per_block, comm, "rows per block")
    return torch.cat([full[b * per_block + comm.rank * size: b * per_block + (comm.rank + 1) * size]
                      for b in range(blocks)])


def _unrows(local: torch.Tensor, comm: Communicator, blocks: int) -> torch.Tensor:
    """The inverse of :func:`_rows`: every rank's rows back in the whole layer's order."""
    n = comm.world_size
    every = comm.all_gather(local.detach().contiguous().reshape(-1)).reshape(n, blocks, -1, *local.shape[1:])
    return every.transpose(0, 1).reshape(-1, *local.shape[1:])


class ColumnParallelLinear(nn.Module):
    """``y = x W^T + b`` with ``W``'s rows (output features) split over ``comm``.

    Args:
        gather_output: concatenate the output slices into the whole output (for a
            last layer); ``False`` leaves each rank its slice, for a following
            :class:`RowParallelLinear` or a vocab-parallel loss.
        blocks: the weight is ``blocks`` stacked matrices each split on its own (3 for
            attention's fused QKV, so every rank gets its heads' q, k and v).
    """

    def __init__(self, in_features: int, out_features: int, comm: Communicator, *, bias: bool = True,
                 gather_output: bool = False, blocks: int = 1):
        super().__init__()
        if gather_output and blocks > 1:
            raise ValueError("a fused (blocks > 1) column-parallel output is consumed split, by a row-parallel "
                             "layer; it cannot be gathered")
        self.comm, self.gather_output, self.blocks = comm, gather_output, blocks
        self.in_features, self.out_features = in_features, out_features
        local = _divide(out_features // blocks, comm, "output features per block") * blocks
        self.weight = nn.Parameter(torch.empty(local, in_features))
        self.bias = nn.Parameter(torch.zeros(local)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    @classmethod
    def from_linear(cls, linear: nn.Linear, comm: Communicator, *, gather_output: bool = False,
                    blocks: int = 1) -> ColumnParallelLinear:
        layer = cls(linear.in_features, linear.out_features, comm, bias=linear.bias is not None,
                    gather_output=gather_output, blocks=blocks)
        with torch.no_grad():
            layer.weight.copy_(_rows(linear.weight, comm, blocks))
            if layer.bias is not None and linear.bias is not None:
                layer.bias.copy_(_rows(linear.bias, comm, blocks))
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(copy_to_tp(x, self.comm), self.weight, self.bias)
        return gather_from_tp(y, self.comm) if self.gather_output else y

    def gather(self) -> nn.Linear:
        """The whole layer, on every rank (a collective)."""
        whole = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            whole.weight.copy_(_unrows(self.weight, self.comm, self.blocks))
            if self.bias is not None and whole.bias is not None:
                whole.bias.copy_(_unrows(self.bias, self.comm, self.blocks))
        return whole


class RowParallelLinear(nn.Module):
    """``y = x W^T + b`` with ``W``'s columns (input features) split over ``comm``; ``b`` is whole.

    Args:
        input_is_parallel: the input arrives already split over the last dimension (the
            output of a :class:`ColumnParallelLinear`); ``False`` splits a whole input here.
    """

    def __init__(self, in_features: int, out_features: int, comm: Communicator, *, bias: bool = True,
                 input_is_parallel: bool = True):
        super().__init__()
        self.comm, self.input_is_parallel = comm, input_is_parallel
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, _divide(in_features, comm, "input features")))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    @classmethod
    def from_linear(cls, linear: nn.Linear, comm: Communicator, *, input_is_parallel: bool = True,
                    ) -> RowParallelLinear:
        layer = cls(linear.in_features, linear.out_features, comm, bias=linear.bias is not None,
                    input_is_parallel=input_is_parallel)
        with torch.no_grad():
            layer.weight.copy_(_rows(linear.weight.t(), comm, 1).t())
            if layer.bias is not None and linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.comm)
        y = reduce_from_tp(F.linear(x, self.weight), self.comm)
        return y + self.bias if self.bias is not None else y

    def gather(self) -> nn.Linear:
        """The whole layer, on every rank (a collective)."""
        whole = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            whole.weight.copy_(_unrows(self.weight.t(), self.comm, 1).t())
            if self.bias is not None and whole.bias is not None:
                whole.bias.copy_(self.bias)
        return whole


class VocabParallelEmbedding(nn.Module):
    """An embedding table whose rows (the vocabulary) are split over ``comm``.

    Rank ``r`` owns ids ``[r * V / n, (r + 1) * V / n)``; pair it with a
    :class:`ColumnParallelLinear` head and :func:`vocab_parallel_cross_entropy` so
    no rank ever holds a whole vocabulary-sized tensor.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, comm: Communicator):
        super().__init__()
        self.comm = comm
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        local = _divide(num_embeddings, comm, "vocabulary size")
        self.start = comm.rank * local
        self.weight = nn.Parameter(torch.empty(local, embedding_dim))
        nn.init.normal_(self.weight)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, comm: Communicator) -> VocabParallelEmbedding:
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, comm)
        with torch.no_grad():
            layer.weight.copy_(_rows(embedding.weight, comm, 1))
        return layer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return reduce_from_tp(out.masked_fill(outside.unsqueeze(-1), 0.0), self.comm)

    def gather(self) -> nn.Embedding:
        """The whole table, on every rank (a collective)."""
        whole = nn.Embedding(self.num_embeddings, self.embedding_dim)
        with torch.no_grad():
            whole.weight.copy_(_unrows(self.weight, self.comm, 1))
        return whole
