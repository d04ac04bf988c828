"""zero-all: zero's product layer -- DeepSpeed's API over the zero packages (``import zero_all as deepspeed``).

The DeepSpeed config -- :func:`load_config` reads ``ds_config.json`` (or YAML, TOML, a
dict) into a strict, typed :class:`DeepSpeedConfig`; a key that cannot run as written is
a one-line :class:`ConfigError` naming it. :func:`initialize` returns the training
:class:`Engine` (``DeepSpeedEngine``) for stages 0-3, precision, accumulation, clipping,
offload and checkpoints, with DeepSpeed's LR schedules (:class:`WarmupLR` and the rest;
any torch scheduler works too), a client optimizer, data loaders and monitoring; given a
``pipe.PipelineModule`` it returns the :class:`PipelineEngine`. DeepSpeed's module names
are here too: ``comm``, ``zero`` (``Init``, ``GatheredParameters``), ``checkpointing``,
``pipe``, ``moe`` (``layer.MoE``), ``sequence`` (``layer.DistributedAttention``),
``accelerator`` (``get_accelerator()``), ``utils`` (``logger``, ``log_dist``),
``runtime.lr_schedules`` and ``ops.adam``. :func:`init_inference` serves a model
(:class:`InferenceEngine`: tensor parallelism, a KV cache, int8 weights, ZeRO-Inference). The
``zero`` command (``run``, ``report``, ``plan``, ``ckpt export``, ``generate``) launches jobs,
reports the environment, plans memory, exports checkpoints and generates text.
"""

from . import (  # DeepSpeed's module names
    accelerator,
    checkpoint,
    checkpointing,
    comm,
    inference,
    launcher,
    moe,
    ops,
    pipe,
    runtime,
    sequence,
    utils,
    zero,
)
from ._config import ActivationCheckpointingConfig, ConfigError, DeepSpeedConfig, OffloadConfig, load_config
from ._engine import (
    DeepSpeedEngine,
    Engine,
    LRRangeTest,
    OneCycle,
    PipelineEngine,
    TorchOptimizerView,
    TorchRule,
    WarmupCosineLR,
    WarmupDecayLR,
    WarmupLR,
    add_config_arguments,
    build_scheduler,
    init_distributed,
    initialize,
)
from ._inference import InferenceEngine, init_inference

__version__ = "0.1.0"

_NOT_PROVIDED = {  # DeepSpeed names that integrations reach for and zero does not have
    "tp_model_init": "AutoTP training (tensor_parallel.autotp_size); zero's tensor parallelism is zero_pipe's layers",
    "init_deepspeed_backend": "an accelerator-specific backend (zero uses torch.distributed's)",
}


def __getattr__(name: str) -> object:
    if name in _NOT_PROVIDED:
        raise AttributeError(f"deepspeed.{name}: zero has no DeepSpeed {_NOT_PROVIDED[name]}")
    raise AttributeError(f"module 'zero_all' has no attribute {name!r}")

__all__ = ["ActivationCheckpointingConfig", "ConfigError", "DeepSpeedConfig", "DeepSpeedEngine", "Engine",
           "InferenceEngine", "LRRangeTest", "OffloadConfig", "OneCycle", "PipelineEngine", "TorchOptimizerView",
           "TorchRule", "WarmupCosineLR", "WarmupDecayLR", "WarmupLR", "accelerator", "add_config_arguments",
           "build_scheduler", "checkpoint", "checkpointing", "comm", "inference", "init_distributed", "init_inference",
           "initialize", "launcher", "load_config", "moe", "ops", "pipe", "runtime", "sequence", "utils", "zero"]
