"""The training engines, one file per part: :func:`initialize` (:mod:`._initialize`) wires a config into
:class:`Engine` (:mod:`._training`: forward, backward, step), its checkpoints (:mod:`._checkpoints` over
:mod:`._state`), what it reports (:mod:`._info`), the optimizer (:mod:`._optim`), LR schedules (:mod:`._lr`),
monitoring (:mod:`._monitor`), expert groups (:mod:`._moe`) and DeepSpeed's launch helpers (:mod:`._compat`);
:class:`PipelineEngine` (:mod:`._pipe`) runs a ``PipelineModule``."""

from ._compat import add_config_arguments, init_distributed
from ._initialize import initialize
from ._lr import SCHEDULES, LRRangeTest, OneCycle, WarmupCosineLR, WarmupDecayLR, WarmupLR, build_scheduler
from ._optim import TorchOptimizerView, TorchRule
from ._pipe import PipelineEngine
from ._training import DeepSpeedEngine, Engine

__all__ = ["SCHEDULES", "DeepSpeedEngine", "Engine", "LRRangeTest", "OneCycle", "PipelineEngine",
           "TorchOptimizerView", "TorchRule", "WarmupCosineLR", "WarmupDecayLR", "WarmupLR", "add_config_arguments",
           "build_scheduler", "init_distributed", "initialize"]
