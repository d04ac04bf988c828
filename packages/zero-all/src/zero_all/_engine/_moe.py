"""What the engine does for mixture-of-experts layers: each expert group's reduce communicator, and
the ZeRO stage they need (ZeRO-3 would partition experts over ranks that do not hold them)."""

from __future__ import annotations

from torch import nn

import zero_comm
import zero_pipe

from .._config import ConfigError

__all__ = ["expert_comms"]


def expert_comms(model: nn.Module, comm: zero_comm.Communicator, stage: int) -> dict[str, zero_comm.Communicator]:
    """Each expert group of ``model`` and the ranks its gradients are reduced over (empty without MoE)."""
    comms = zero_pipe.expert_data_comms(model, comm)
    if comms and stage == 3:
        raise ConfigError(
            "zero_optimization.stage: 3 partitions every parameter over all ranks, but this model's "
            "MoE experts live on some ranks only; train it at stage 0, 1 or 2"
        )
    return comms
