"""Sequence parallelism by all-to-all (DeepSpeed-Ulysses): attention over a sequence split over ranks.

Each rank holds a contiguous slice of the sequence. Before attention one all-to-all
per input trades it for the whole sequence of ``heads / ranks`` heads; attention,
which mixes positions but never heads, then runs unchanged on whole sequences; a
last all-to-all trades the output back to this rank's slice of the sequence, all
heads. Per layer that is four all-to-alls of ``1/ranks`` of the activations, however
long the sequence. Everything outside attention (norms, MLPs, the loss) acts
position by position and needs no communication.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from zero_comm import Communicator

from ._a2a import all_to_all

__all__ = ["UlyssesAttention"]


class UlyssesAttention(nn.Module):
    """Wrap ``local_attention(q, k, v, *args, **kwargs)`` to run on a sequence split over ``comm``.

    Args:
        scatter_idx: the heads dimension of q, k, v and the output (split over the ranks).
        gather_idx: the sequence dimension (split on the way in, whole inside attention).

    The default layout is DeepSpeed's ``[sequence, batch, heads, head_dim]``; pass
    ``scatter_idx=2, gather_idx=1`` for ``[batch, sequence, heads, head_dim]``.
    """

    def __init__(self, local_attention: nn.Module | Any, comm: Communicator, scatter_idx: int = 2, gather_idx: int = 0):
        super().__init__()
        if scatter_idx == gather_idx:
            raise ValueError(f"scatter_idx and gather_idx must be different dimensions, both are {scatter_idx}")
        self.local_attn, self.comm = local_attention, comm
        self.scatter_idx, self.gather_idx = scatter_idx, gather_idx

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        n = self.comm.world_size
        for name, t in (("query", query), ("key", key), ("value", value)):
            heads = t.shape[self.scatter_idx]
            if heads % n:
                raise ValueError(
                    f"sequence parallelism over {n} ranks: the {name} has {heads} heads (dimension "
                    f"{self.scatter_idx} of shape {tuple(t.shape)}), not divisible by {n}"
                )
        q, k, v = (all_to_all(t, self.comm, self.scatter_idx, self.gather_idx) for t in (query, key, value))
        context = self.local_attn(q, k, v, *args, **kwargs)
        return all_to_all(context, self.comm, self.gather_idx, self.scatter_idx)
