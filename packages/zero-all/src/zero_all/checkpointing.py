"""``deepspeed.checkpointing``: activation checkpointing configured once, used everywhere.

DeepSpeed's API is process-wide -- ``configure(...)`` once, then ``checkpoint(fn,
*args)`` from any model code -- so this module keeps one configured
:class:`zero_ckpt.ActivationCheckpointing` and one :class:`zero_ckpt.RNGStatesTracker`
(the model-parallel RNG streams a recomputation replays). The engine applies a
config's ``activation_checkpointing`` block through :func:`configure_from_config`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import zero_ckpt
import zero_comm

from ._config import ActivationCheckpointingConfig, DeepSpeedConfig, load_config

__all__ = [
    "checkpoint",
    "configure",
    "configure_from_config",
    "get_cuda_rng_tracker",
    "is_configured",
    "model_parallel_cuda_manual_seed",
    "reset",
]

MODEL_PARALLEL_RNG = "model-parallel-rng"  # DeepSpeed's (and Megatron's) name of the tensor-parallel stream


@dataclass
class _Settings:
    """What ``configure`` set (DeepSpeed keeps these as module globals)."""

    checkpointing: zero_ckpt.ActivationCheckpointing | None = None
    mpu: Any = None
    tracker: zero_ckpt.RNGStatesTracker = field(default_factory=zero_ckpt.RNGStatesTracker)


_settings = _Settings()


def configure(mpu_: Any, deepspeed_config: Any = None, partition_activations: bool | None = None,
              contiguous_checkpointing: bool | None = None, num_checkpoints: int | None = None,
              checkpoint_in_cpu: bool | None = None, synchronize: bool | None = None,
              profile: bool | None = None) -> None:
    """Configure activation checkpointing (DeepSpeed's ``checkpointing.configure``).

    ``mpu_`` is the model-parallel unit (``get_model_parallel_group()`` or
    ``get_tensor_model_parallel_group()``): ``partition_activations`` splits each kept
    input across its group; without one the group is this rank alone and there is
    nothing to split. ``deepspeed_config`` (a ds_config dict, file or parsed config)
    gives the ``activation_checkpointing`` block; the other arguments override its keys.
    """
    if mpu_ is not None:
        _settings.mpu = mpu_
    block = (load_config(deepspeed_config).activation_checkpointing if deepspeed_config is not None
             else ActivationCheckpointingConfig())
    overrides = {"partition_activations": partition_activations,
                 "contiguous_memory_optimization": contiguous_checkpointing,
                 "number_checkpoints": num_checkpoints, "cpu_checkpointing": checkpoint_in_cpu,
                 "synchronize_checkpoint_boundary": synchronize, "profile": profile}
    settings: dict[str, Any] = {"partition_activations": block.partition_activations,
                                "contiguous_memory_optimization": block.contiguous_memory_optimization,
                                "number_checkpoints": block.number_checkpoints,
                                "cpu_checkpointing": block.cpu_checkpointing,
                                "synchronize_checkpoint_boundary": block.synchronize_checkpoint_boundary,
                                "profile": block.profile}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    if settings["contiguous_memory_optimization"] and not settings["partition_activations"]:
        raise ValueError("checkpointing.configure: contiguous_checkpointing needs partition_activations (as in "
                         "DeepSpeed)")
    if settings["contiguous_memory_optimization"] and settings["number_checkpoints"] is None:
        raise ValueError("checkpointing.configure: contiguous_checkpointing needs num_checkpoints")
    tp_comm = _model_parallel_comm(_settings.mpu)
    if tp_comm is None:
        settings["partition_activations"] = False  # a group of one rank: nothing to split
    _settings.checkpointing = zero_ckpt.ActivationCheckpointing(
        zero_ckpt.ActivationCheckpointConfig(**settings), tp_comm=tp_comm, rng_tracker=_settings.tracker)


def configure_from_config(config: DeepSpeedConfig) -> None:
    """Apply a config's ``activation_checkpointing`` block (what ``initialize`` calls)."""
    configure(None, deepspeed_config=config)


def is_configured() -> bool:
    """Whether :func:`configure` has run (DeepSpeed's check before using its settings)."""
    return _settings.checkpointing is not None


def reset() -> None:
    """DeepSpeed frees its contiguous checkpoint buffers here; zero keeps none between calls, so this
    only exists for scripts that call it."""


def checkpoint(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``function(*args, **kwargs)`` keeping only its inputs for backward; the rest is recomputed
    (with the RNG states of the forward). Works unconfigured, with DeepSpeed's defaults."""
    if _settings.checkpointing is None:
        _settings.checkpointing = zero_ckpt.ActivationCheckpointing(rng_tracker=_settings.tracker)
    return _settings.checkpointing.checkpoint(function, *args, **kwargs)


def get_cuda_rng_tracker() -> zero_ckpt.RNGStatesTracker:
    """The tracker of named RNG streams (``with get_cuda_rng_tracker().fork():`` draws from the
    model-parallel stream); on the CUDA device where there is one, else the CPU generator."""
    return _settings.tracker


def model_parallel_cuda_manual_seed(seed: int) -> None:
    """Seed the default generator with ``seed`` (the same on every tensor-parallel rank) and a fresh
    model-parallel stream with ``seed + 2718 + tensor-parallel rank`` (different on each), as DeepSpeed."""
    tp_comm = _model_parallel_comm(_settings.mpu)
    tp_rank = tp_comm.rank if tp_comm is not None else 0
    tracker = zero_ckpt.RNGStatesTracker()
    if tracker.device.type == "cuda":
        torch.cuda.manual_seed(seed)
    else:
        torch.manual_seed(seed)
    tracker.add(MODEL_PARALLEL_RNG, seed + 2718 + tp_rank)
    _settings.tracker = tracker
    if _settings.checkpointing is not None:
        _settings.checkpointing.rng_tracker = tracker


def _model_parallel_comm(mpu: Any) -> zero_comm.ProcessGroupCommunicator | None:
    if mpu is None:
        return None
    get = getattr(mpu, "get_tensor_model_parallel_group", None) or getattr(mpu, "get_model_parallel_group", None)
    if get is None:
        raise TypeError(f"checkpointing: the mpu {type(mpu).__name__} has neither get_tensor_model_parallel_group() "
                        "nor get_model_parallel_group()")
    comm = zero_comm.ProcessGroupCommunicator(get(), name="tp")
    return comm if comm.world_size > 1 else None
