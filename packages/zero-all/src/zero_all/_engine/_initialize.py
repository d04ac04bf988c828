"""``deepspeed.initialize``: a config applied to a model, in order -- the config read and resolved for the
data-parallel world, then the pipeline engine for a ``PipelineModule`` or the training engine for any other
model, with its data loader."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

import zero_comm

from .._config import ConfigError, load_config
from ._pipe import PipelineEngine, is_pipeline
from ._training import Engine, model_hidden_size

__all__ = ["initialize"]


def initialize(args: Any = None, model: nn.Module | None = None, optimizer: Any = None,
               model_parameters: Iterable[Any] | None = None, training_data: Any = None,
               lr_scheduler: Any = None, config: Any = None, config_params: Any = None,
               dist_init_required: bool | None = None,
               collate_fn: Callable[..., Any] | None = None) -> tuple[Engine, Any, Any, Any]:
    """DeepSpeed's ``initialize``: returns ``(engine, optimizer, dataloader, lr_scheduler)``.

    ``config`` (or ``config_params``, or ``args.deepspeed_config``) is a ds_config dict or
    file. ``optimizer`` is a client optimizer (or a callable making one from
    ``model_parameters``) instead of the config's ``optimizer`` block; ``lr_scheduler`` a
    scheduler built on that optimizer, or a callable making one from the engine's
    ``basic_optimizer``, instead of the config's ``scheduler`` block (naming both is an
    error). ``training_data`` (a torch Dataset) comes back as a loader over the
    data-parallel ranks (:meth:`Engine.deepspeed_io`), else the loader is None.
    """
    if model is None:
        raise ValueError("initialize needs the model")
    source = config if config is not None else config_params
    from_args = getattr(args, "deepspeed_config", None) if args is not None else None
    if source is not None and from_args is not None:
        raise ConfigError(f"config: initialize was given a config and args.deepspeed_config ({from_args!r}) too; "
                          "keep one")
    if source is None:
        source = from_args
    if source is None:
        raise ConfigError("config: pass config=... (a dict or a ds_config file) or args.deepspeed_config")
    comm = zero_comm.init_distributed()
    from ..checkpointing import configure_from_config
    from ..zero import check_partitioned_model
    if is_pipeline(model):
        pipe = PipelineEngine(model, source, comm, model_parameters, optimizer=optimizer, lr_scheduler=lr_scheduler,
                              training_data=training_data, collate_fn=collate_fn)
        return pipe, pipe.optimizer, pipe.training_dataloader, pipe.lr_scheduler  # type: ignore[return-value]
    dp = comm.world_size
    resolved = load_config(source).resolve(dp, hidden_size=model_hidden_size(model))
    check_partitioned_model(model, resolved)  # zero.Init models need stage 3
    configure_from_config(resolved)  # the activation_checkpointing block
    engine = Engine(model, resolved, comm, model_parameters, optimizer=optimizer, lr_scheduler=lr_scheduler,
                    collate_fn=collate_fn)
    if training_data is not None:
        engine.training_dataloader = engine.deepspeed_io(training_data)
    optimizer_out = engine.optimizer if engine.trains else None  # DeepSpeed: None for an evaluation-only engine
    return engine, optimizer_out, engine.training_dataloader, engine.lr_scheduler
