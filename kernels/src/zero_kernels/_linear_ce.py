"""Fused linear + cross-entropy: the loss of ``x @ weight.T (+ bias)`` without the logits.

A language model's last layer maps N tokens to V-way logits; with V = 50k and
N = 8k the fp32 logits alone are 1.6 GB, and their gradient as much again. Here
the tokens are processed in chunks: for each chunk the logits are computed, turned
in place into their gradient (softmax minus one-hot, scaled), and immediately
multiplied back into the gradients of ``x``, ``weight`` and ``bias``. Only one
chunk of logits ever exists. The gradients are computed during the forward (the
loss is a scalar, so the backward only scales them), which is why the op's
inputs must not be modified between forward and backward.
"""

from __future__ import annotations

from typing import Literal

import torch

from ._dispatch import use_triton, warps_for

__all__ = ["fused_linear_cross_entropy"]

DEFAULT_CHUNK_ELEMENTS = 2**23  # logits elements per chunk: 32 MiB of fp32


def fused_linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                               bias: torch.Tensor | None = None, *, ignore_index: int = -100,
                               reduction: Literal["mean", "sum"] = "mean",
                               chunk_size: int | None = None) -> torch.Tensor:
    """``cross_entropy(x @ weight.T + bias, target)`` computed chunk by chunk over tokens.

    Args:
        x: ``(..., hidden)`` activations. weight: ``(vocab, hidden)``. bias: ``(vocab,)``.
        target: class indices with the shape of ``x`` minus its last dimension;
            ``ignore_index`` entries add nothing to the loss or the gradients.
        reduction: ``"mean"`` over the non-ignored tokens, or ``"sum"``.
        chunk_size: tokens per chunk; default keeps a chunk's logits at about
            8M elements. Smaller saves memory, larger runs bigger matmuls.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    hidden = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != hidden:
        raise ValueError(f"weight must have shape (vocab, {hidden}), got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if target.shape != x.shape[:-1]:
        raise ValueError(f"target must have shape {tuple(x.shape[:-1])}, got {tuple(target.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _LinearCrossEntropy.apply(x, weight, target, bias, ignore_index, reduction, chunk_size)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, target, bias, ignore_index, reduction, chunk_size):
        rows = x.reshape(-1, x.shape[-1])
        labels = target.reshape(-1)
        n, vocab = rows.shape[0], weight.shape[0]
        if chunk_size is None:
            chunk_size = max(1, DEFAULT_CHUNK_ELEMENTS // vocab)
        n_valid = int((labels != ignore_index).sum())
        scale = 1.0 / max(n_valid, 1) if reduction == "mean" else 1.0
        want_x, want_w = x.requires_grad, weight.requires_grad
        want_b = bias is not None and bias.requires_grad
        grad_x = torch.empty_like(rows) if want_x else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if want_b else None
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        for start in range(0, n, chunk_size):
            chunk, chunk_labels = rows[start:start + chunk_size], labels[start:start + chunk_size]
            logits = chunk @ weight.t()
            if bias is not None:
                logits += bias
            logits = logits.float()
            loss += _loss_and_grad_in_place(logits, chunk_labels, ignore_index, scale)
            grad_logits = logits.to(rows.dtype)
            if grad_x is not None:
                torch.matmul(grad_logits, weight, out=grad_x[start:start + chunk_size])
            if grad_w is not None:
                grad_w.addmm_(logits.t(), chunk.to(torch.float32))
            if grad_b is not None:
                grad_b += logits.sum(0)
            del logits, grad_logits
        ctx.save_for_backward(grad_x, grad_w, grad_b)
        ctx.x_shape, ctx.w_dtype = x.shape, weight.dtype
        return loss * scale if reduction == "mean" else loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, grad_w, grad_b = ctx.saved_tensors
        gx = (grad_x * grad_out).view(ctx.x_shape) if grad_x is not None else None
        gw = (grad_w * grad_out).to(ctx.w_dtype) if grad_w is not None else None
        gb = (grad_b * grad_out).to(ctx.w_dtype) if grad_b is not None else None
        return gx, gw, None, gb, None, None, None


def _loss_and_grad_in_place(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                            scale: float) -> torch.Tensor:
    """Sum of this chunk's token losses; ``logits`` (fp32) become ``d(loss)/d(logits)``."""
    if use_triton(logits, labels):
        import triton

        from ._triton_ce import ce_grad_kernel

        losses = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        if logits.shape[0]:
            block = min(4096, triton.next_power_of_2(logits.shape[1]))
            ce_grad_kernel[(logits.shape[0],)](logits, labels.contiguous(), losses, logits.shape[1], ignore_index,
                                               scale, BLOCK=block, num_warps=warps_for(block))
        return losses.sum()
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    lse = torch.logsumexp(logits, dim=1)
    losses = (lse - logits.gather(1, safe[:, None]).squeeze(1)) * valid
    logits.sub_(lse[:, None]).exp_()
    logits.scatter_add_(1, safe[:, None], torch.full_like(lse[:, None], -1.0))
    logits.mul_((valid * scale)[:, None])
    return losses.sum()
