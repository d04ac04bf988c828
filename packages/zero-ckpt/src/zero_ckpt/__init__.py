"""zero-ckpt: activation checkpointing, and sharded, resharding, atomic, verified state checkpoints.

Activations: :class:`ActivationCheckpointing` (``checkpoint``, ``sequential``) over
``torch.utils.checkpoint`` with DeepSpeed's options, and :class:`RNGStatesTracker`.
State: :class:`CheckpointManager` (``save``/``load``, sync or async) writes a
checkpoint from N ranks that M ranks read back; :func:`consolidate` and
:func:`export` turn one into a plain ``state_dict`` without a process group: the saved
module's whole ``state_dict`` (masters, untrained weights, buffers, tied keys) where a
:class:`ModuleState` item recorded it, and safetensors for a ``.safetensors`` name.
"""

from ._activation import ActivationCheckpointConfig, ActivationCheckpointing, CheckpointStats
from ._export import consolidate, export, save_state_dict
from ._format import CheckpointError
from ._items import Checkpointable, FullTensor, ShardedTensorLike, module_state, tensors_state
from ._module import ModuleRecord, ModuleState, module_record
from ._reader import CheckpointReader, latest_tag
from ._rng import RNGStatesTracker
from ._state import CheckpointManager

__version__ = "0.1.0"

__all__ = [
    "ActivationCheckpointConfig",
    "ActivationCheckpointing",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointReader",
    "CheckpointStats",
    "Checkpointable",
    "FullTensor",
    "ModuleRecord",
    "ModuleState",
    "RNGStatesTracker",
    "ShardedTensorLike",
    "consolidate",
    "export",
    "latest_tag",
    "module_record",
    "module_state",
    "save_state_dict",
    "tensors_state",
]
