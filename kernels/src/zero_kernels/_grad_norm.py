"""Global gradient norm in one pass, with an inf/NaN flag.

What fp16 loss scaling (skip the step on overflow) and global-norm clipping both
need, computed from one read of every gradient: the fp32 sum of squares across a
list of tensors of any floating dtype, and whether any element was inf or NaN.
Off the Triton path the norms come from ``torch._foreach_norm`` (one call over the
fp32 tensors) and ``torch.linalg.vector_norm`` (fp32 accumulation for the others),
with the elements checked only when the total is not finite.
"""

from __future__ import annotations

import torch

from ._dispatch import check_contiguous, grid_1d, kernel_path

__all__ = ["global_grad_norm", "grad_norm_sq"]


def grad_norm_sq(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of squares, found_nonfinite)`` over all ``tensors``, as 0-d fp32 and bool tensors.

    The flag is computed from the elements, not from the sum, so a large but
    finite gradient whose square overflows fp32 is not mistaken for an overflow.
    """
    if not tensors:
        raise ValueError("grad_norm_sq needs at least one tensor")
    device = tensors[0].device
    for i, t in enumerate(tensors):
        if not t.is_floating_point():
            raise ValueError(f"tensors[{i}] must be floating point, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"tensors[{i}] is on {t.device}, expected {device}")
    if kernel_path(*tensors) == "torch":
        return _builtin([t.detach() for t in tensors if t.numel()], device)
    total = torch.zeros((), dtype=torch.float32, device=device)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    for t in tensors:
        if t.numel() == 0:
            continue
        if kernel_path(t) == "triton":
            s, bad = _partial_triton(t)
        else:
            s, bad = _partial_reference(t.detach())
        total += s
        nonfinite |= bad
    return total, nonfinite


def global_grad_norm(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L2 norm, found_nonfinite)`` over all ``tensors``."""
    total, nonfinite = grad_norm_sq(tensors)
    return total.sqrt(), nonfinite


def _partial_reference(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    norm = torch.linalg.vector_norm(t, 2, dtype=torch.float32)
    if bool(torch.isfinite(norm)):  # the reference runs off-GPU, where this check costs no sync
        return norm.square(), torch.zeros((), dtype=torch.bool, device=t.device)
    # an infinite norm is either an inf/NaN element or finite values whose squares overflow
    return norm.square(), ~torch.isfinite(t).all()


def _builtin(tensors: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's result from torch's norm ops: one sync for the whole list, not one per tensor."""
    fp32 = [t for t in tensors if t.dtype == torch.float32]
    norms = list(torch._foreach_norm(fp32, 2)) if fp32 else []
    norms += [torch.linalg.vector_norm(t, 2, dtype=torch.float32) for t in tensors if t.dtype != torch.float32]
    if not norms:
        return torch.zeros((), dtype=torch.float32, device=device), torch.zeros((), dtype=torch.bool, device=device)
    total = torch.stack(norms).square().sum()
    if bool(torch.isfinite(total)):
        return total, torch.zeros((), dtype=torch.bool, device=device)
    # as in the reference: an infinite total is an inf/NaN element or finite squares that overflow fp32
    return total, torch.stack([~torch.isfinite(t).all() for t in tensors]).any()


def _partial_triton(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from ._triton_reduce import sumsq_kernel

    check_contiguous(tensor=t)
    programs, block = grid_1d(t.numel())
    sums = torch.empty(programs, dtype=torch.float32, device=t.device)
    bad = torch.empty(programs, dtype=torch.int32, device=t.device)
    sumsq_kernel[(programs,)](t, sums, bad, t.numel(), BLOCK=block)
    return sums.sum(), bad.sum() > 0
