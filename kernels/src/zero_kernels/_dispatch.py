"""Which implementation runs: the Triton kernel, torch's built-in op, or the hand-written reference.

CUDA tensors go to Triton (when triton imports); every other device goes to
torch's own op where torch has a faster one with the same meaning (``F.layer_norm``,
``F.rms_norm``, ``torch._foreach_norm``, a shorter quantisation formula), else
to the hand-written torch reference, which defines the maths and is what the
kernels are tested against. ``ZERO_KERNELS=reference``, ``torch`` or ``triton``
forces a path; forcing Triton on CPU tensors needs ``TRITON_INTERPRET=1`` (the
interpreter runs kernels on CPU tensors, which is how CI checks them without a GPU).
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import triton.language as tl

__all__ = ["interpreting", "kernel_path", "triton_available", "use_triton"]

_CHOICES = ("reference", "torch", "triton", "auto")


@functools.cache
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:  # not installed, or (in interpreter mode) numpy missing
        return str(exc)
    return None


def triton_available() -> bool:
    return _triton_import_error() is None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_path(*tensors: torch.Tensor) -> str:
    """``"triton"``, ``"torch"`` (torch's built-in op) or ``"reference"``: what runs on ``tensors``.

    An op without a built-in counterpart runs its reference on the ``"torch"`` path.
    """
    choice = os.environ.get("ZERO_KERNELS", "auto").lower()
    if choice not in _CHOICES:
        raise ValueError(f"ZERO_KERNELS={choice!r}; expected one of {', '.join(_CHOICES)}")
    if choice in ("reference", "torch"):
        return choice
    on_cuda = all(t.is_cuda for t in tensors)
    if choice == "triton":
        if not triton_available():
            raise RuntimeError(f"ZERO_KERNELS=triton but triton cannot be imported: {_triton_import_error()}")
        if not on_cuda and not interpreting():
            raise RuntimeError("ZERO_KERNELS=triton on non-CUDA tensors needs TRITON_INTERPRET=1")
        return "triton"
    return "triton" if on_cuda and triton_available() else "torch"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernel should run on ``tensors``."""
    return kernel_path(*tensors) == "triton"


def check_contiguous(**tensors: torch.Tensor | None) -> None:
    """Kernels index memory as if stride were 1: refuse anything else by name."""
    for name, t in tensors.items():
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (got strides {tuple(t.stride())}); call .contiguous()")


def block_size(n: int, cap: int = 1024) -> int:
    import triton

    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


def as_tensor_lists(n_expected: int | None = None, **groups: torch.Tensor | list[torch.Tensor] | None
                    ) -> dict[str, list[torch.Tensor] | None]:
    """Normalise each argument to a list of tensors and check that they line up element by element."""
    out: dict[str, list[torch.Tensor] | None] = {}
    length = n_expected
    for name, value in groups.items():
        if value is None:
            out[name] = None
            continue
        items = [value] if isinstance(value, torch.Tensor) else list(value)
        if length is None:
            length = len(items)
        elif len(items) != length:
            raise ValueError(f"{name} has {len(items)} tensors, expected {length}")
        out[name] = items
    present = [v for v in out.values() if v is not None]
    first = present[0] if present else []
    for name, tensors in out.items():
        for i, (t, ref) in enumerate(zip(tensors or [], first)):
            if t.numel() != ref.numel():
                raise ValueError(f"{name}[{i}] has {t.numel()} elements, expected {ref.numel()}")
            if t.device != ref.device:
                raise ValueError(f"{name}[{i}] is on {t.device}, expected {ref.device}")
    return out


def require_fp32(**lists: list[torch.Tensor] | None) -> None:
    """Master weights and optimizer state are fp32; say which one is not."""
    for name, items in lists.items():
        for i, t in enumerate(items or []):
            if t.dtype != torch.float32:
                raise ValueError(f"{name}[{i}] must be fp32 (master weights and optimizer state), got {t.dtype}")


def triton_acc(dtype: torch.dtype) -> tl.dtype:
    """The Triton dtype a kernel computes in for ``dtype`` input: fp64 for fp64, else fp32.

    The references compute in ``promote_types(dtype, float32)``; a kernel that narrowed
    fp64 to fp32 would hand back fp64 tensors holding fp32-accurate values.
    """
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def grid_1d(n: int) -> tuple[int, int]:
    """(number of programs, block) for an elementwise kernel over ``n`` elements."""
    import triton

    block = block_size(n)
    return triton.cdiv(n, block), block


def warps_for(block: int) -> int:
    """Warps per program for a row-wise kernel whose row block has ``block`` elements."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4
