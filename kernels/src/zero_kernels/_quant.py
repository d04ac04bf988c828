"""Blockwise symmetric int8 quantisation, one fp32 scale per block.

A flat tensor is cut into blocks of ``block_size`` elements (the last may be
short); each block's scale is ``max|x| / 127`` and its values become
``round(x / scale)`` in [-127, 127], rounding half away from zero. Dequantising
multiplies back. The error per element is at most half a scale step, so a block
with one large value loses precision only within that block: what compressed
gradient communication wants.
"""

from __future__ import annotations

import torch

from ._dispatch import check_contiguous, use_triton

__all__ = ["dequantize_int8", "quantize_int8"]


def _check_block(block_size: int) -> None:
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")


def quantize_int8(x: torch.Tensor, block_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scales)``: ``q`` int8 with ``x.numel()`` elements (flat), ``scales`` fp32, one per block."""
    _check_block(block_size)
    if not x.is_floating_point():
        raise ValueError(f"quantize_int8 needs a floating-point tensor, got {x.dtype}")
    flat = x.reshape(-1)
    n = flat.numel()
    blocks = -(-n // block_size)
    if use_triton(flat):
        from ._triton_reduce import quantize_kernel

        check_contiguous(x=flat)
        q = torch.empty(n, dtype=torch.int8, device=x.device)
        scales = torch.empty(blocks, dtype=torch.float32, device=x.device)
        if n:
            quantize_kernel[(blocks,)](flat, q, scales, n, BLOCK=block_size)
        return q, scales
    padded = torch.zeros(blocks * block_size, dtype=torch.float32, device=x.device)
    padded[:n] = flat
    rows = padded.view(blocks, block_size)
    scales = rows.abs().amax(dim=1) / 127.0
    y = torch.where(scales[:, None] > 0, rows / scales[:, None].clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    q = (y.sign() * (y.abs() + 0.5).floor()).clamp_(-127, 127).to(torch.int8)
    return q.view(-1)[:n].clone(), scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, block_size: int = 256,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The flat tensor ``q * scale`` of ``dtype`` (reshape it to the original shape)."""
    _check_block(block_size)
    n = q.numel()
    if scales.numel() != -(-n // block_size):
        raise ValueError(f"{scales.numel()} scales do not match {n} values in blocks of {block_size}")
    if use_triton(q):
        from ._triton_reduce import dequantize_kernel

        check_contiguous(q=q, scales=scales)
        out = torch.empty(n, dtype=dtype, device=q.device)
        if n:
            dequantize_kernel[(scales.numel(),)](q, scales, out, n, BLOCK=block_size)
        return out
    per_element = scales.repeat_interleave(block_size)[:n]
    return (q.to(torch.float32) * per_element).to(dtype)
