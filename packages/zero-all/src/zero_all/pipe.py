"""``deepspeed.pipe``: ``PipelineModule``, ``LayerSpec`` and ``TiedLayerSpec`` with DeepSpeed's arguments.

The classes are zero-pipe's; what this module adds is DeepSpeed's way of building
them: a ``PipelineModule`` works out its own stage from the process's rank (ranks
are laid out pipeline-major, as DeepSpeed's ``PipeDataParallelTopology``: with ``P``
stages over ``W`` ranks, rank ``r`` is stage ``r // (W / P)``), and seeds its layers
from ``base_seed`` when ``seed_layers`` is set. ``initialize(model=PipelineModule(...))``
returns the pipeline engine (:mod:`zero_all._engine._pipe`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch.utils.checkpoint
from torch import nn

import zero_comm
import zero_pipe
from zero_pipe import LayerSpec

from . import checkpointing

__all__ = ["LayerSpec", "PipelineModule", "TiedLayerSpec"]


class TiedLayerSpec(zero_pipe.TiedLayerSpec):
    """DeepSpeed's ``TiedLayerSpec(key, typename, *args, forward_fn=None, tied_weight_attr=["weight"], **kwargs)``.

    zero ties the whole module (every stage holding ``key`` shares all of its
    parameters), so ``tied_weight_attr`` must name every parameter the module has;
    a module with other parameters is refused when it is built."""

    def __init__(self, key: str, typename: type[nn.Module], *args: Any,
                 forward_fn: Callable[[nn.Module, Any], Any] | None = None,
                 tied_weight_attr: str | Sequence[str] = ("weight",), **kwargs: Any):
        super().__init__(key, typename, *args, forward_fn=forward_fn, **kwargs)
        self.tied_weight_attr = [tied_weight_attr] if isinstance(tied_weight_attr, str) else list(tied_weight_attr)

    def build(self) -> nn.Module:
        module = super().build()
        others = sorted(n for n, _ in module.named_parameters() if n not in self.tied_weight_attr)
        if others:
            raise ValueError(f"TiedLayerSpec({self.key!r}): tied_weight_attr {self.tied_weight_attr} leaves "
                             f"{others} of {type(module).__name__} untied; zero ties every parameter of a tied "
                             "module: list them all in tied_weight_attr")
        return module


class PipelineModule(zero_pipe.PipelineModule):
    """DeepSpeed's ``PipelineModule``: ``layers`` cut into ``num_stages`` stages, this rank building its own.

    ``partition_method``: ``"parameters"``, ``"uniform"`` or ``"type:<regex>"``.
    ``activation_checkpoint_interval``: recompute runs of that many layers in backward.
    ``seed_layers``: layer ``i`` is built after seeding with ``base_seed + i``.
    ``dynamic_shape``: activations may change shape from batch to batch.
    ``schedule`` (zero's addition): the pipeline schedule the engine runs, ``"1f1b"``
    (DeepSpeed's) or ``"gpipe"``. Refused: ``topology`` (pass ``num_stages``), ``seed_fn``,
    ``checkpointable_layers`` and an ``activation_checkpoint_func`` other than
    ``deepspeed.checkpointing.checkpoint`` or ``torch.utils.checkpoint.checkpoint``.
    """

    def __init__(self, layers: Sequence[Any], num_stages: int | None = None, topology: Any = None,
                 loss_fn: Callable[[Any, Any], Any] | None = None, seed_layers: bool = False,
                 seed_fn: Callable[[int], None] | None = None, base_seed: int = 1234,
                 partition_method: str = "parameters", activation_checkpoint_interval: int = 0,
                 activation_checkpoint_func: Callable[..., Any] = checkpointing.checkpoint,
                 checkpointable_layers: list[str] | None = None, dynamic_shape: bool = False, *,
                 schedule: str = "1f1b"):
        if topology is not None:
            raise NotImplementedError("PipelineModule(topology=...) is not supported: pass num_stages; ranks are "
                                      "laid out pipeline-major, as PipeDataParallelTopology does")
        if num_stages is None:
            raise ValueError("PipelineModule needs num_stages")
        for name, value in (("seed_fn", seed_fn), ("checkpointable_layers", checkpointable_layers)):
            if value is not None:
                raise NotImplementedError(f"PipelineModule({name}=...) is not supported")
        if activation_checkpoint_func not in (checkpointing.checkpoint, torch.utils.checkpoint.checkpoint):
            raise NotImplementedError("PipelineModule(activation_checkpoint_func=...): zero recomputes with "
                                      "torch.utils.checkpoint (non-reentrant); pass no function")
        if schedule not in ("1f1b", "gpipe"):
            raise ValueError(f"PipelineModule(schedule={schedule!r}): the pipeline engine runs '1f1b' or 'gpipe'")
        world = zero_comm.init_distributed()
        if world.world_size % num_stages:
            raise ValueError(f"PipelineModule(num_stages={num_stages}): the world of {world.world_size} ranks is not "
                             "a whole number of pipelines")
        stage_id = world.rank // (world.world_size // num_stages)
        super().__init__(layers, num_stages, stage_id=stage_id, loss_fn=loss_fn, partition_method=partition_method,
                         activation_checkpoint_interval=activation_checkpoint_interval,
                         seed=base_seed if seed_layers else None)
        self.partition_method, self.seed_layers, self.base_seed = partition_method, seed_layers, base_seed
        self.dynamic_shape, self.schedule = dynamic_shape, schedule
