"""zero-pipe: pipeline parallelism with schedules as data, and tensor-parallel layers.

A pipeline schedule is a list of instructions per stage made by a pure function
(:func:`gpipe`, :func:`one_f_one_b`, :func:`interleaved_1f1b`), checked without
processes by :func:`simulate`, and run by one interpreter, :class:`PipelineEngine`,
over zero-comm's point-to-point operations.
"""

from ._engine import BatchTiming, Optimizer, PipelineEngine
from ._layers import LayerSpec, TiedLayerSpec
from ._module import PipelineModule
from ._partition import layer_weights, partition_balanced
from ._schedule import Action, Op, Schedule
from ._schedules import SCHEDULES, gpipe, interleaved_1f1b, make_schedule, one_f_one_b
from ._simulate import ScheduleError, SimResult, simulate, theoretical_bubble
from ._transport import PipelineAborted, PipelineError

__version__ = "0.1.0"

__all__ = [
    "SCHEDULES",
    "Action",
    "BatchTiming",
    "LayerSpec",
    "Op",
    "Optimizer",
    "PipelineAborted",
    "PipelineEngine",
    "PipelineError",
    "PipelineModule",
    "Schedule",
    "ScheduleError",
    "SimResult",
    "TiedLayerSpec",
    "gpipe",
    "interleaved_1f1b",
    "layer_weights",
    "make_schedule",
    "one_f_one_b",
    "partition_balanced",
    "simulate",
    "theoretical_bubble",
]
