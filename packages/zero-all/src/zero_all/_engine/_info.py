"""What the engines tell a script about the run, by DeepSpeed's names (:class:`EngineInfo`), and the
optimizer of an engine built without one (:class:`NoOptimizer`)."""

from __future__ import annotations

from typing import Any

import torch

import zero_comm
import zero_optim

from .._config import DeepSpeedConfig

__all__ = ["EngineInfo", "NoOptimizer"]


class NoOptimizer:
    """The optimizer of an engine initialized without one (DeepSpeed's evaluation-only engine at stages 0-2):
    the model stays as it is; anything that needs an optimizer says so."""

    def __init__(self) -> None:
        self.param_groups: list[dict[str, Any]] = []
        self.last_grad_norm = None
        self.scaler = None

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"optimizer.{name}: this engine was initialized without an optimizer (none given, none "
                           "in the config); add an \"optimizer\" block to the config or pass optimizer=... to train")


class EngineInfo:
    """What both engines tell a script about the run (DeepSpeed's names): ranks, precision, ZeRO stage,
    the last gradient norm. Reads ``config``, ``optimizer`` and ``dp_world_size``."""

    config: DeepSpeedConfig
    optimizer: zero_optim.ShardedOptimizer
    dp_world_size: int

    @property
    def local_rank(self) -> int:
        """This process's rank on its node, as its launcher set it."""
        return zero_comm.detect_launch_env().local_rank

    @property
    def global_rank(self) -> int:
        return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

    @property
    def world_size(self) -> int:
        """Every rank of the job (data-parallel replicas times pipeline stages)."""
        return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1

    def fp16_enabled(self) -> bool:
        return self.config.fp16.enabled is True

    def bfloat16_enabled(self) -> bool:
        return self.config.bf16.enabled is True

    def zero_optimization_stage(self) -> int:
        return int(self.config.zero_optimization.stage)

    def zero_optimization(self) -> bool:
        """Whether a ZeRO stage above 0 partitions the optimizer."""
        return self.zero_optimization_stage() > 0

    def loss_scale(self) -> float:
        """The config's static fp16 loss scale, 0 when it is dynamic (DeepSpeed's meaning); the scale
        in use now is ``engine.optimizer.loss_scale``."""
        return float(self.config.fp16.loss_scale)

    def get_global_grad_norm(self) -> float | None:
        """The gradient norm over every rank before clipping, at the last step that was applied (None
        before the first)."""
        return self.optimizer.last_grad_norm

    def gradient_clipping(self) -> float:
        """The config's clipping threshold for the gradient norm (0: no clipping)."""
        return float(self.config.gradient_clipping)

    def get_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def get_mom(self) -> list[Any]:
        """Each group's ``betas`` (Adam-like rules) or ``momentum`` (SGD)."""
        return [g["betas"] if "betas" in g else g.get("momentum") for g in self.optimizer.param_groups]
