"""What the inference engine needs to know of a model: its kind, head counts, layer stack, weights.

Three kinds of causal LM are served: Hugging Face Transformers models (they have a
``config`` and ``generate``; their own cache is used), models that decode with a
:class:`zero_pipe.KVCache` (their forward takes ``kv_cache``, as ``examples/gpt.py``'s
GPT does), and any other module returning logits (decoded without a cache). None
of this imports transformers.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._config import ConfigError

__all__ = ["check_tp_divides", "find_layers", "is_hf", "load_weights", "model_dimension", "takes_kv_cache"]


def is_hf(model: nn.Module) -> bool:
    return hasattr(model, "config") and callable(getattr(model, "generate", None)) and hasattr(model, "can_generate")


def takes_kv_cache(model: nn.Module) -> bool:
    try:
        return "kv_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


# (where the count is, how to name it) for the dimensions tensor parallelism splits
_DIMENSIONS = (("num_attention_heads", "attention heads"), ("num_key_value_heads", "key/value heads"),
               ("n_head", "attention heads"), ("intermediate_size", "MLP features"), ("n_inner", "MLP features"))


def model_dimension(model: nn.Module, attrs: tuple[str, ...]) -> tuple[int, str] | None:
    """The first of ``attrs`` that the model's config (Hugging Face's ``config``, or ``cfg``) holds as an
    integer, with where it was found (``GPT2LMHeadModel.config.n_positions``)."""
    for owner_name in ("config", "cfg"):
        owner = getattr(model, owner_name, None)
        for attr in attrs:
            value = getattr(owner, attr, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value, f"{type(model).__name__}.{owner_name}.{attr}"
    return None


def check_tp_divides(model: nn.Module, tp_size: int) -> None:
    """A one-line error naming the model's dimension that ``tp_size`` does not divide."""
    for attr, what in _DIMENSIONS:
        found = model_dimension(model, (attr,))
        if found is not None and found[0] % tp_size:
            raise ConfigError(f"tensor_parallel.tp_size: {tp_size} does not divide the model's {found[0]} {what} "
                              f"({found[1]})")


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of repeated blocks: its largest ``nn.ModuleList`` (``transformer.h``,
    ``model.layers``, ``blocks``), by parameter count."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, name, module)
    if best is None:
        raise ConfigError(f"zero.offload_param: {type(model).__name__} has no nn.ModuleList of layers to stream")
    return best[1], best[2]


def load_weights(model: nn.Module, checkpoint: str | dict[str, Any], base_dir: str = "") -> str:
    """Load ``checkpoint`` into ``model`` (strictly): a zero checkpoint directory (its ``latest`` tag),
    a ``.pt``/``.bin`` state_dict (read with ``weights_only=True``), a ``.safetensors`` file, or DeepSpeed's
    description (a dict or ``.json`` file naming one such file in ``checkpoints``, relative to ``base_dir``,
    default the file's directory); return what was loaded, for the log line."""
    if isinstance(checkpoint, dict):
        files = checkpoint.get("checkpoints")
        if not (isinstance(files, list) and len(files) == 1 and isinstance(files[0], str)):
            raise ConfigError("checkpoint: zero reads a checkpoint description with one file in 'checkpoints'; "
                              f"got {checkpoint!r}")
        checkpoint = files[0]
    path = Path(base_dir) / checkpoint
    if path.suffix == ".json" and path.is_file():  # DeepSpeed's checkpoint description file
        import json

        try:
            description = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"checkpoint: {path} is not a JSON checkpoint description ({exc})") from None
        if not isinstance(description, dict):
            raise ConfigError(f"checkpoint: {path} is not a JSON checkpoint description (not an object)")
        return load_weights(model, description, base_dir or str(path.parent))
    if path.is_dir():
        from ..utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        if not (path / "latest").exists():
            raise ConfigError(f"checkpoint: {path} is a directory without a 'latest' file: not a zero checkpoint")
        state = get_fp32_state_dict_from_zero_checkpoint(path)
    elif not path.is_file():
        raise ConfigError(f"checkpoint: {path} does not exist")
    elif path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ConfigError(f"checkpoint: reading {path.name} needs the safetensors package") from None
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ConfigError(f"checkpoint: {path} does not hold a state_dict")
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if _is_tied_alias(model, k, state)}
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ConfigError(f"checkpoint: {path} does not match {type(model).__name__}: missing {missing[:4]}, "
                          f"unexpected {unexpected[:4]}")
    return str(path)


def _is_tied_alias(model: nn.Module, key: str, state: dict[str, Any]) -> bool:
    """``key`` names a parameter shared with another key that the state_dict did give."""
    target = model.state_dict(keep_vars=True).get(key)
    return target is not None and any(
        other in state and other != key for other, t in model.state_dict(keep_vars=True).items() if t is target)
