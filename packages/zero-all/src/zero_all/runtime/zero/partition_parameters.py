"""``deepspeed.runtime.zero.partition_parameters``: where DeepSpeed's ``Init`` lives.

DeepSpeed's ``Init`` swaps torch's tensor constructors for wrappers (``zero_wrapper_for_fp_tensor_constructor``)
while a model is built, and Hugging Face's Transformers swaps that wrapper in turn to keep ``torch.arange``'s
dtype. zero's ``Init`` patches no torch function (each module's parameters are partitioned as its
``__init__`` returns), so nothing here is ever called by zero: the names exist so code that saves and
restores them runs, and replacing them changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ...zero import GatheredParameters, Init

__all__ = ["GatheredParameters", "Init", "zero_wrapper_for_fp_tensor_constructor"]

_orig_torch_arange = torch.arange  # DeepSpeed's name for the unpatched constructor


def zero_wrapper_for_fp_tensor_constructor(fn: Callable[..., Any], target_fp_dtype: torch.dtype,
                                           target_device: Any = None) -> Callable[..., Any]:
    """``fn`` unchanged: zero does not redirect tensor construction (see the module docstring)."""
    del target_fp_dtype, target_device
    return fn
