"""zero-optim: ZeRO stages 0-3 -- data-parallel training that partitions its state.

See :class:`ZeroOptimizer` (stages 0-2) and :class:`ZeroStage3` (with
:func:`partitioned` construction and :func:`gathered` access), which steps the shards of a
:class:`ParameterSharder` -- usable alone, with a torch optimizer or for inference. Update
rules (:class:`AdamW`, :class:`Adam`, :class:`Lion`, :class:`SGD`) run on zero-kernels' fused ops; where optimizer state
lives is a :class:`StateStore` (device memory by default).
"""

from ._base import ShardedOptimizer
from ._config import ZeroConfig
from ._construct import partitioned
from ._layout import Bucket, GroupLayout, build_layout
from ._optimizer import ZeroOptimizer
from ._partition import GatherUnit, ParamShard, PartitionedParameter, PartitionedParameterError, gathered
from ._rules import LAMB, SGD, Adam, AdamW, Lion, UpdateRule, check_hyperparameters
from ._scaler import DynamicLossScaler, LossScaleConfig
from ._sharded import ShardedTensor, ShardPiece
from ._sharder import ParameterSharder, TrainingState
from ._stage3 import ZeroStage3
from ._store import DeviceStore, StateStore
from ._units import granularity, unit_parameters

__version__ = "0.2.0"

__all__ = [
    "LAMB",
    "SGD",
    "Adam",
    "AdamW",
    "Bucket",
    "DeviceStore",
    "DynamicLossScaler",
    "GatherUnit",
    "GroupLayout",
    "Lion",
    "LossScaleConfig",
    "ParamShard",
    "ParameterSharder",
    "PartitionedParameter",
    "PartitionedParameterError",
    "ShardPiece",
    "ShardedOptimizer",
    "ShardedTensor",
    "StateStore",
    "TrainingState",
    "UpdateRule",
    "ZeroConfig",
    "ZeroOptimizer",
    "ZeroStage3",
    "build_layout",
    "check_hyperparameters",
    "gathered",
    "granularity",
    "partitioned",
    "unit_parameters",
]
