"""Cross-entropy over logits whose vocabulary is split over the tensor-parallel ranks.

Gathering ``[tokens, vocabulary]`` logits onto every rank would undo the memory a
vocab-parallel head saves. Instead each rank reduces its slice to three numbers
per token -- its maximum logit, its sum of exponentials, and the target's logit if
it owns the target -- and three small all-reduces (max, sum, sum) give the exact
softmax cross-entropy (Megatron-LM's ``vocab_parallel_cross_entropy``). The
gradient, ``softmax - one_hot``, is computed on each rank's slice without any
communication.
"""

from __future__ import annotations

from typing import Any

import torch

from zero_comm import Communicator

__all__ = ["vocab_parallel_cross_entropy"]


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, comm: Communicator) -> torch.Tensor:
        local_vocab = logits.shape[-1]
        start = comm.rank * local_vocab
        peak = logits.detach().max(dim=-1).values.contiguous()
        comm.all_reduce(peak, "max")
        shifted = logits.detach() - peak.unsqueeze(-1)
        exp = shifted.exp()
        total = exp.sum(dim=-1).contiguous()
        comm.all_reduce(total)
        local = targets - start
        owned = (local >= 0) & (local < local_vocab)
        index = local.clamp(0, local_vocab - 1)
        picked = (shifted.gather(-1, index.unsqueeze(-1)).squeeze(-1) * owned).contiguous()
        comm.all_reduce(picked)
        ctx.save_for_backward(exp.div_(total.unsqueeze(-1)), index, owned)
        return total.log() - picked

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        softmax, index, owned = ctx.saved_tensors
        out = softmax.clone()
        out.scatter_add_(-1, index.unsqueeze(-1), -owned.to(out.dtype).unsqueeze(-1))
        return out * grad.unsqueeze(-1), None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """Mean cross-entropy of ``targets`` (global ids, ``[...]``) under ``logits`` (``[..., V / n]``,
    this rank's vocabulary slice, as a :class:`ColumnParallelLinear` head without ``gather_output``
    gives it)."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {list(logits.shape)} and targets {list(targets.shape)} disagree on the "
                         "leading dimensions")
    flat = logits.reshape(-1, logits.shape[-1])
    return _VocabParallelCrossEntropy.apply(flat, targets.reshape(-1), comm).mean()
