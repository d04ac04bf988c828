"""``deepspeed.utils.zero_to_fp32``: a zero checkpoint as one fp32 ``state_dict``, without a process group.

DeepSpeed's three functions with its names and arguments, over :func:`zero_ckpt.consolidate`:
the state_dict holds the trained weights (the fp32 masters, whatever stage and world size
wrote them), the untrained weights, the persistent buffers and every tied weight under each
of its names, so ``model.load_state_dict(sd, strict=True)`` takes it. A checkpoint written
before zero recorded the module's layout gives its master weights and saved buffers, with a
warning. ``output_file`` names ending in ``.safetensors`` are written with safetensors (the
``safetensors`` package, ``pip install 'zero-all[safetensors]'``), as is any name with
``safe_serialization=True``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

import zero_ckpt

from .._engine._monitor import logger  # a leaf module: the _engine room imports utils

__all__ = ["convert_zero_checkpoint_to_fp32_state_dict", "get_fp32_state_dict_from_zero_checkpoint",
           "load_state_dict_from_zero_checkpoint"]


def get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir: str | os.PathLike, tag: str | None = None,
                                             exclude_frozen_parameters: bool = False) -> dict[str, torch.Tensor]:
    """The fp32 ``state_dict`` of the model saved in ``checkpoint_dir`` (the directory holding ``latest``)
    at ``tag`` (default: the one ``latest`` names), on the CPU. ``exclude_frozen_parameters`` leaves out
    the weights the optimizer did not train."""
    return zero_ckpt.consolidate(checkpoint_dir, tag, dtype=torch.float32, frozen=not exclude_frozen_parameters)


def convert_zero_checkpoint_to_fp32_state_dict(checkpoint_dir: str | os.PathLike, output_file: str | os.PathLike,
                                               tag: str | None = None, exclude_frozen_parameters: bool = False, *,
                                               safe_serialization: bool = False) -> Path:
    """Write :func:`get_fp32_state_dict_from_zero_checkpoint`'s state_dict to ``output_file`` atomically:
    ``torch.save``, or safetensors for a ``.safetensors`` name or ``safe_serialization=True`` (a tied
    weight is then stored once per name). Returns the path written (DeepSpeed returns nothing)."""
    out = Path(output_file)
    if safe_serialization and out.suffix != ".safetensors":
        out = out.with_name(out.name + ".safetensors")
    state = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag, exclude_frozen_parameters)
    logger.info(f"Saving fp32 state dict to {out}")
    return zero_ckpt.save_state_dict(state, out)


def load_state_dict_from_zero_checkpoint(model: nn.Module, checkpoint_dir: str | os.PathLike,
                                         tag: str | None = None, *, strict: bool = False) -> nn.Module:
    """Move ``model`` to the CPU and load the fp32 weights of ``checkpoint_dir``'s checkpoint into it;
    returns it. ``strict`` is False as in DeepSpeed (the keys the checkpoint lacks, or the model lacks,
    are logged); pass True to insist that they match. A model wrapped by a live engine should be loaded
    through ``engine.load_checkpoint`` instead: this replaces its tensors wholesale."""
    state = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag)
    model = model.cpu()
    result = model.load_state_dict(state, strict=strict)
    if result.missing_keys or result.unexpected_keys:
        logger.warning(f"load_state_dict_from_zero_checkpoint: {len(result.missing_keys)} keys of the model are not "
                       f"in the checkpoint ({', '.join(result.missing_keys[:3])}), {len(result.unexpected_keys)} "
                       f"of its keys are not in the model ({', '.join(result.unexpected_keys[:3])})")
    return model
