"""zero-all: zero's product layer.

So far: the DeepSpeed config -- :func:`load_config` reads ``ds_config.json`` (or YAML,
TOML, a dict) into a strict, typed :class:`DeepSpeedConfig`; a key that cannot run as
written is a one-line :class:`ConfigError` naming it -- and :func:`initialize` with its
:class:`Engine` for stages 0-3, precision, accumulation, clipping, offload and
checkpoints, DeepSpeed's LR schedules (:class:`WarmupLR` and the rest; any torch
scheduler works too), a client optimizer, data loaders and monitoring. The pipeline
engine, the DeepSpeed-named modules, the ``zero`` CLI and the demo are still to come
(issue 9).
"""

from . import checkpointing, comm, ops, pipe, runtime, zero  # DeepSpeed's module names: deepspeed.zero.Init, ...
from ._compat import add_config_arguments, init_distributed
from ._config import ActivationCheckpointingConfig, ConfigError, DeepSpeedConfig, OffloadConfig, load_config
from ._engine import Engine, initialize
from ._lr import LRRangeTest, OneCycle, WarmupCosineLR, WarmupDecayLR, WarmupLR, build_scheduler
from ._optim import TorchOptimizerView, TorchRule

__version__ = "0.1.0"

__all__ = ["ActivationCheckpointingConfig", "ConfigError", "DeepSpeedConfig", "Engine", "LRRangeTest",
           "OffloadConfig", "OneCycle", "TorchOptimizerView", "TorchRule", "WarmupCosineLR", "WarmupDecayLR",
           "WarmupLR", "add_config_arguments", "build_scheduler", "checkpointing", "comm", "init_distributed",
           "initialize", "load_config", "ops", "pipe", "runtime", "zero"]
