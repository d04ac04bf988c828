"""int8 weight-only quantisation of a model, in place: weights stored as int8, computed in float.

Every module with a 2-D (or larger) floating ``weight`` -- linears, Hugging Face's
``Conv1D``, embeddings, tensor-parallel linears -- keeps ``weight_int8`` (the blockwise
int8 values of :func:`quantize_int8`) and ``weight_scale`` (one fp32 scale per block)
in place of its weight. A forward pre-hook dequantises the weight for that forward
(:func:`dequantize_int8`: the Triton kernel on CUDA, torch elsewhere) and a forward
hook drops it again, so between forwards a module holds one byte per weight plus
``4 / block_size`` bytes of scales: 0.266 of fp32 at the default 64. The module's own
forward is untouched, so a tensor-parallel layer keeps its collectives. Weights tied
across modules (an output head sharing the token embedding) are quantised once and
shared. Activations stay in the weight's original dtype: this saves memory and
bandwidth, not arithmetic.

The trade-off of ``block_size``: smaller blocks follow the weights' local range more
closely (less error) and cost more scale bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ._quant import dequantize_int8, quantize_int8

__all__ = ["QuantizedWeights", "quantize_weights_", "weight_bytes"]


@dataclass(frozen=True)
class QuantizedWeights:
    """What :func:`quantize_weights_` did: the modules it quantised, and weight bytes before and after."""

    modules: tuple[str, ...]
    bytes_before: int
    bytes_after: int
    block_size: int

    @property
    def ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0


def _storages(tensors: Iterable[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and persistent buffers, each storage counted once."""
    return _storages([*model.parameters(), *model.buffers()])


class _Dequantize:
    """The pre- and post-forward hooks of one quantised module."""

    def __init__(self, dtype: torch.dtype, shape: torch.Size, block_size: int):
        self.dtype, self.shape, self.block_size = dtype, shape, block_size

    def before(self, module: nn.Module, args: object) -> None:
        q, scales = module.get_buffer("weight_int8"), module.get_buffer("weight_scale")
        module.weight = dequantize_int8(q.reshape(-1), scales, self.block_size, self.dtype).view(self.shape)

    def after(self, module: nn.Module, args: object, output: object) -> None:
        module.weight = None  # type: ignore[assignment]  # a plain attribute once the parameter is gone


def quantize_weights_(model: nn.Module, *, block_size: int = 64,
                      include: Callable[[str, nn.Module], bool] | None = None) -> QuantizedWeights:
    """Quantise ``model``'s weights to int8 in place; return what was done.

    Args:
        block_size: elements per scale (a power of two >= 16).
        include: ``(name, module) -> bool`` to choose modules (default: every module whose
            ``weight`` is a floating parameter of 2 or more dimensions).
    """
    before = weight_bytes(model)
    shared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    done: list[str] = []
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is None or weight.dim() < 2 or not weight.is_floating_point():
            continue
        if include is not None and not include(name, module):
            continue
        key = weight.untyped_storage().data_ptr()
        if key not in shared:
            q, scales = quantize_int8(weight.detach().contiguous(), block_size)
            shared[key] = (q.view(weight.shape), scales)
        q, scales = shared[key]
        hooks = _Dequantize(weight.dtype, weight.shape, block_size)
        del module._parameters["weight"]
        module.register_buffer("weight_int8", q)
        module.register_buffer("weight_scale", scales)
        module.weight = None
        module.register_forward_pre_hook(hooks.before)
        module.register_forward_hook(hooks.after, always_call=True)
        done.append(name)
    return QuantizedWeights(tuple(done), before, weight_bytes(model), block_size)
