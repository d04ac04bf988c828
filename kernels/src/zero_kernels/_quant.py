"""Blockwise symmetric int8 quantisation, one fp32 scale per block.

A flat tensor is cut into blocks of ``block_size`` elements (the last may be
short); each block's scale is ``max|x| / 127`` and its values become
``round(x / scale)`` in [-127, 127], rounding half away from zero. Dequantising
multiplies back. The error per element is at most half a scale step, so a block
with one large value loses precision only within that block: what compressed
gradient communication wants. Off the Triton path a shorter torch formula with the
reference's exact results runs (no padded copy of whole blocks, rounding by
truncating ``y ± 0.5``); ``ZERO_KERNELS=reference`` runs the reference itself.
"""

from __future__ import annotations

import torch

from ._dispatch import check_contiguous, kernel_path

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
    path = kernel_path(flat)
    if path == "triton":
        from ._triton_reduce import quantize_kernel

        check_contiguous(x=flat)
        q = torch.empty(n, dtype=torch.int8, device=x.device)
        scales = torch.empty(blocks, dtype=torch.float32, device=x.device)
        if n:
            quantize_kernel[(blocks, 1)](flat, q, scales, n, blocks, BLOCK=block_size)
        return q, scales
    if path == "torch":
        return _quantize_builtin(flat, block_size)
    return _quantize_reference(flat, block_size)


def _quantize_reference(flat: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = flat.numel()
    blocks = -(-n // block_size)
    padded = torch.zeros(blocks * block_size, dtype=torch.float32, device=flat.device)
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
    path = kernel_path(q)
    if path == "triton":
        from ._triton_reduce import dequantize_kernel

        check_contiguous(q=q, scales=scales)
        out = torch.empty(n, dtype=dtype, device=q.device)
        if n:
            dequantize_kernel[(scales.numel(), 1)](q, scales, out, n, scales.numel(), BLOCK=block_size)
        return out
    if path == "torch":
        return _dequantize_builtin(q, scales, block_size, dtype)
    per_element = scales.repeat_interleave(block_size)[:n]
    return (q.to(torch.float32) * per_element).to(dtype)


def _quantize_builtin(flat: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's bits: whole blocks as a view, only a short last block padded."""
    n = flat.numel()
    whole = n // block_size * block_size
    x = flat.to(torch.float32)
    parts = [x[:whole].view(whole // block_size, block_size)]
    if whole < n:
        parts.append(torch.nn.functional.pad(x[whole:], (0, block_size - (n - whole)))[None])
    qs, scales = zip(*(_quantize_rows(rows) for rows in parts))
    q = qs[0].view(-1) if len(qs) == 1 else torch.cat([qs[0].view(-1), qs[1].view(-1)[:n - whole]])
    return q, scales[0] if len(scales) == 1 else torch.cat(scales)


def _quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scales = rows.abs().amax(dim=1) / 127.0
    y = rows / scales[:, None].clamp_min(torch.finfo(torch.float32).tiny)
    # round half away from zero: y + copysign(0.5, y), truncated toward zero by the int8 cast
    q = y.add_(torch.copysign(torch.full_like(scales, 0.5)[:, None], y)).to(torch.int8)
    unset = ~(scales > 0)  # NaN scales: the reference writes 0 (zero scales already give 0)
    if bool(unset.any()):
        q[unset] = 0
    return q, scales


def _dequantize_builtin(q: torch.Tensor, scales: torch.Tensor, block_size: int,
                        dtype: torch.dtype) -> torch.Tensor:
    n = q.numel()
    whole = n // block_size * block_size
    flat = q.reshape(-1).to(torch.float32)
    out = torch.empty(n, dtype=dtype, device=q.device)
    full = whole // block_size
    out[:whole].view(-1, block_size).copy_(flat[:whole].view(-1, block_size) * scales[:full, None])
    if whole < n:
        out[whole:] = flat[whole:] * scales[full]
    return out
