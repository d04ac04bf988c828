"""zero-optim: ZeRO stages 0-2 -- a data-parallel optimizer that partitions its state.

See :class:`ZeroOptimizer`. Update rules (:class:`AdamW`, :class:`Adam`,
:class:`Lion`, :class:`SGD`) run on zero-kernels' fused ops; where optimizer state
lives is a :class:`StateStore` (device memory by default).
"""

from ._layout import Bucket, GroupLayout, build_layout
from ._optimizer import ZeroConfig, ZeroOptimizer
from ._rules import LAMB, SGD, Adam, AdamW, Lion, UpdateRule, check_hyperparameters
from ._scaler import DynamicLossScaler, LossScaleConfig
from ._sharded import ShardedTensor, ShardPiece
from ._store import DeviceStore, StateStore

__version__ = "0.1.0"

__all__ = [
    "LAMB",
    "SGD",
    "Adam",
    "AdamW",
    "Bucket",
    "DeviceStore",
    "DynamicLossScaler",
    "GroupLayout",
    "Lion",
    "LossScaleConfig",
    "ShardPiece",
    "ShardedTensor",
    "StateStore",
    "UpdateRule",
    "ZeroConfig",
    "ZeroOptimizer",
    "build_layout",
    "check_hyperparameters",
]
