"""zero-kernels: fused ops as Triton kernels for CUDA tensors and torch references elsewhere.

Every public function dispatches on its inputs (see :func:`use_triton`):
CUDA tensors run the Triton kernel, other devices the vectorised torch
reference; ``ZERO_KERNELS=reference|triton`` forces a path.
"""

from ._adam import adam_step
from ._dispatch import use_triton
from ._grad_norm import global_grad_norm, grad_norm_sq
from ._int8_weights import QuantizedWeights, quantize_weights_, weight_bytes
from ._linear_ce import fused_linear_cross_entropy
from ._lion import lion_step
from ._memory import peak_memory
from ._norms import layer_norm, rms_norm
from ._quant import dequantize_int8, quantize_int8
from ._quant_rows import dequantize_int8_rows, quantize_int8_rows
from ._rope import apply_rotary, rotary_tables
from ._sgd import sgd_step

__version__ = "0.1.0"

__all__ = [
    "QuantizedWeights",
    "adam_step",
    "apply_rotary",
    "dequantize_int8",
    "dequantize_int8_rows",
    "fused_linear_cross_entropy",
    "global_grad_norm",
    "grad_norm_sq",
    "layer_norm",
    "lion_step",
    "peak_memory",
    "quantize_int8",
    "quantize_int8_rows",
    "quantize_weights_",
    "rms_norm",
    "rotary_tables",
    "sgd_step",
    "use_triton",
    "weight_bytes",
]
