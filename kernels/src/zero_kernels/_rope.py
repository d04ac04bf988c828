"""Rotary position embedding (rotate-half form, as GPT-NeoX and LLaMA), forward and backward.

``x`` has shape ``(..., seq, heads, head_dim)``; ``cos`` and ``sin`` have shape
``(seq, head_dim // 2)``. With ``x = [x1, x2]`` split in halves of the last
dimension, the output is ``[x1*cos - x2*sin, x2*cos + x1*sin]``. The rotation is
orthogonal, so the backward is the same rotation by the opposite angle.
"""

from __future__ import annotations

import torch

from ._dispatch import triton_acc, use_triton

__all__ = ["apply_rotary", "rotary_tables"]


def rotary_tables(seq_len: int, head_dim: int, base: float = 10000.0, *, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` of shape ``(seq_len, head_dim // 2)`` for the standard inverse-frequency schedule."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    angles = torch.arange(seq_len, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` by the position angles in ``cos``/``sin``; differentiable in ``x``."""
    if x.dim() < 3:
        raise ValueError(f"x must have shape (..., seq, heads, head_dim), got {tuple(x.shape)}")
    seq, head_dim = x.shape[-3], x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    if cos.shape != (seq, head_dim // 2) or sin.shape != cos.shape:
        raise ValueError(f"cos and sin must have shape ({seq}, {head_dim // 2}) for x of shape {tuple(x.shape)}; "
                         f"got {tuple(cos.shape)} and {tuple(sin.shape)}")
    return _Rotary.apply(x, cos, sin)


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x.contiguous(), cos.contiguous(), sin.contiguous(), 1.0)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rotate(dy.contiguous(), cos.contiguous(), sin.contiguous(), -1.0), None, None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    if use_triton(x, cos):
        return _rotate_triton(x, cos, sin, sign)
    acc = torch.promote_types(x.dtype, torch.float32)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].to(acc), x[..., half:].to(acc)
    c = cos.to(acc)[:, None, :]  # broadcast over heads
    s = sin.to(acc)[:, None, :] * sign
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def _rotate_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    import triton

    from ._triton_rope import rotary_kernel

    seq, heads, head_dim = x.shape[-3:]
    rows = x.numel() // head_dim
    out = torch.empty_like(x)
    if rows:
        half = head_dim // 2
        rotary_kernel[(rows,)](x, cos, sin, out, seq, heads, half, sign, ACC=triton_acc(x.dtype),
                               BLOCK=triton.next_power_of_2(half))
    return out
