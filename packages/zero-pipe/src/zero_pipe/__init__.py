"""zero-pipe: pipeline parallelism with schedules as data, and tensor-parallel layers.

A pipeline schedule is a list of instructions per stage made by a pure function
(:func:`gpipe`, :func:`one_f_one_b`, :func:`interleaved_1f1b`), checked without
processes by :func:`simulate`, and run by one interpreter, :class:`PipelineEngine`,
over zero-comm's point-to-point operations.

Tensor parallelism: :class:`ColumnParallelLinear`, :class:`RowParallelLinear`,
:class:`VocabParallelEmbedding`, :func:`vocab_parallel_cross_entropy`, and
:func:`tensor_parallelize`, which rewrites a GPT-style model's linears in place (also
Hugging Face GPT-2 and Llama-family models).

Decoding: :class:`KVCache`, a preallocated key/value cache whose cost per token is flat.

Mixture of experts: :class:`MoELayer` (top-1/top-2 :class:`TopKGate` with capacity, experts
spread over an expert-parallel group by :func:`all_to_all`). Sequence parallelism:
:class:`UlyssesAttention` (heads scattered, sequence gathered, by all-to-all).
"""

from ._a2a import all_to_all
from ._engine import BatchTiming, Optimizer, PipelineEngine
from ._errors import PipelineAborted, PipelineError
from ._kv_cache import KVCache
from ._layers import LayerSpec, TiedLayerSpec
from ._module import PipelineModule
from ._moe import Experts, MoELayer, every_expert_name, expert_data_comms, is_expert_param
from ._moe_gate import GateConfig, Routing, TopKGate, expert_capacity, top1_routing, top2_routing
from ._partition import layer_weights, partition_balanced
from ._schedule import Action, Op, Schedule
from ._schedules import SCHEDULES, gpipe, interleaved_1f1b, make_schedule, one_f_one_b, zb_h1
from ._simulate import ScheduleError, SimResult, simulate, theoretical_bubble
from ._tp_layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from ._tp_loss import vocab_parallel_cross_entropy
from ._tp_ops import copy_to_tp, gather_from_tp, reduce_from_tp, scatter_to_tp
from ._tp_rewrite import GPT_PLAN, tensor_parallelize
from ._ulysses import UlyssesAttention

__version__ = "0.1.0"

__all__ = [
    "GPT_PLAN",
    "SCHEDULES",
    "Action",
    "BatchTiming",
    "ColumnParallelLinear",
    "Experts",
    "GateConfig",
    "KVCache",
    "LayerSpec",
    "MoELayer",
    "Op",
    "Optimizer",
    "PipelineAborted",
    "PipelineEngine",
    "PipelineError",
    "PipelineModule",
    "Routing",
    "RowParallelLinear",
    "Schedule",
    "ScheduleError",
    "SimResult",
    "TiedLayerSpec",
    "TopKGate",
    "UlyssesAttention",
    "VocabParallelEmbedding",
    "all_to_all",
    "copy_to_tp",
    "every_expert_name",
    "expert_capacity",
    "expert_data_comms",
    "gather_from_tp",
    "gpipe",
    "interleaved_1f1b",
    "is_expert_param",
    "layer_weights",
    "make_schedule",
    "one_f_one_b",
    "partition_balanced",
    "reduce_from_tp",
    "scatter_to_tp",
    "simulate",
    "tensor_parallelize",
    "theoretical_bubble",
    "top1_routing",
    "top2_routing",
    "vocab_parallel_cross_entropy",
    "zb_h1",
]
