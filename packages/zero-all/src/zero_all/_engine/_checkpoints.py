"""The engine's checkpoints: DeepSpeed's ``save_checkpoint``/``load_checkpoint`` (every rank its shards,
through :mod:`._state` and zero-ckpt) and the whole-model exports (``save_16bit_model`` and the
consolidated state dict Hugging Face's Trainer and Accelerate save with ``from_pretrained``'s layout)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import zero_optim
from zero_ckpt import save_state_dict

from ..utils import log_dist
from ._state import load_optimizer, no_custom_load, nothing_to_resume, save_optimizer

__all__ = ["EngineCheckpoints", "check_node_local_storage", "read_checkpoint", "write_checkpoint"]

COUNTERS = ("global_steps", "micro_steps", "skipped_steps", "global_samples")


def write_checkpoint(engine: Any, module: torch.nn.Module, comm: Any, save_dir: str | Path, tag: str | None,
                     client_state: dict | None, save_latest: bool) -> bool:
    """Save ``engine``'s ZeRO state (every rank its shards), counters and scheduler, and ``client_state``, as
    ``save_dir/tag``: the one writer both engines use (the pipeline engine passes its stage's engine, with
    the stage's module and the whole world)."""
    tag = tag or f"global_step{engine.global_steps}"
    state = {"client_state": client_state or {}, **{k: getattr(engine, k) for k in COUNTERS},
             "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None}
    if engine.basic_optimizer is not None:
        engine.basic_optimizer.sync_client()  # the hyper-parameters a client's scheduler set since the last step
    save_optimizer(engine.optimizer, module, comm, save_dir, tag, state, update_latest=save_latest)
    return True


def read_checkpoint(engine: Any, module: torch.nn.Module, comm: Any, load_dir: str | Path, tag: str | None, *,
                    whole_model: bool, strict: bool, optimizer_states: bool, lr_scheduler_states: bool,
                    module_only: bool) -> tuple[str | None, dict | None]:
    """Load what :func:`write_checkpoint` wrote back into ``engine`` (see ``Engine.load_checkpoint``)."""
    if nothing_to_resume(load_dir, tag):
        return None, None
    loaded, state = load_optimizer(engine.optimizer, module, comm, load_dir, tag, strict=strict,
                                   weights_only=module_only or not optimizer_states, restore_rng=not module_only,
                                   whole_model=whole_model, counters=("global_steps", "skipped_steps"))
    if not module_only:
        engine.global_steps, engine.skipped_steps = state["global_steps"], state["skipped_steps"]
        # older checkpoints (and the pipeline engine's, before it wrote them) lack these two
        engine.micro_steps = state.get("micro_steps", engine.global_steps * engine.gradient_accumulation_steps())
        engine.global_samples = state.get("global_samples", engine.global_steps * engine.train_batch_size())
        saved = state.get("lr_scheduler")
        if lr_scheduler_states and engine.lr_scheduler is not None and saved is not None:
            engine.lr_scheduler.load_state_dict(saved)
    if engine.basic_optimizer is not None:
        engine.basic_optimizer.sync_client()  # the loaded hyper-parameters reach a client optimizer too
    return str(Path(load_dir) / loaded), state["client_state"]


def _nodes() -> int | None:
    """How many nodes the launcher spread the job over, where it says (torchrun, Slurm, Open MPI)."""
    world = os.environ.get("WORLD_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE")
    local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE")
    if os.environ.get("SLURM_NNODES"):
        return int(os.environ["SLURM_NNODES"])
    if world and local:
        return max(1, int(world) // max(1, int(local)))
    return 1 if not world or int(world) == 1 else None


def check_node_local_storage(config: Any) -> None:
    """``checkpoint.use_node_local_storage`` (Hugging Face's ``--save_on_each_node``): on one node every rank
    already writes to storage the others read, so it changes nothing; across nodes zero has no per-node copy."""
    if not config.checkpoint.use_node_local_storage:
        return
    nodes = _nodes()
    if nodes != 1:
        from .._config import ConfigError

        raise ConfigError(f"checkpoint.use_node_local_storage: zero writes checkpoints to storage every rank shares; "
                          f"this job spans {nodes or 'an unknown number of'} nodes (set it to false and save to a "
                          "shared filesystem)")


class EngineCheckpoints:
    """Mixed into :class:`~zero_all.Engine`: what it saves and loads."""

    if TYPE_CHECKING:  # what the engine provides
        config: Any
        comm: Any
        module: torch.nn.Module
        optimizer: Any

    def save_checkpoint(self, save_dir: str | Path, tag: str | None = None, client_state: dict | None = None,
                        save_latest: bool = True) -> bool:
        """Save the ZeRO state (every rank its shards), the scheduler's state and ``client_state``
        (tensors and plain data) as ``save_dir/tag``, replacing an existing ``tag`` atomically; with
        ``save_latest`` (the default) ``latest`` then names it. Returns True, as DeepSpeed does."""
        return write_checkpoint(self, self.module, self.comm, save_dir, tag, client_state, save_latest)

    def load_checkpoint(self, load_dir: str | Path, tag: str | None = None, load_module_strict: bool = True,
                        load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                        load_module_only: bool = False, custom_load_fn: Callable[..., Any] | None = None
                        ) -> tuple[str | None, dict | None]:
        """Load ``load_dir/tag`` (default: the latest); returns ``(path, client_state)``, or
        ``(None, None)`` when ``tag`` is not given and ``load_dir`` holds no checkpoint yet (as
        DeepSpeed does, so a script can always try to resume). All or nothing: if any rank cannot
        load it, every rank raises the same CheckpointError and nothing has changed.

        DeepSpeed's options: ``load_optimizer_states=False`` loads the weights (the fp32 master
        weights, into the model) and the counters and scheduler, keeping the optimizer's own state
        (moments, step count, loss scale, hyper-parameters) as it is; ``load_module_only=True``
        loads the weights alone (warm-starting: counters, scheduler and RNG stay).
        ``load_module_strict=False`` lets the weights of the checkpoint and the model differ in
        names (those in both are loaded). ``custom_load_fn`` is not supported (the weights are
        loaded as fp32 shards, not through a module state dict)."""
        no_custom_load(custom_load_fn)
        return read_checkpoint(self, self.module, self.comm, load_dir, tag, whole_model=True,
                               strict=load_module_strict, optimizer_states=load_optimizer_states,
                               lr_scheduler_states=load_lr_scheduler_states, module_only=load_module_only)

    def zero_gather_16bit_weights_on_model_save(self) -> bool:
        """Whether a stage-3 model save gathers the whole weights (``stage3_gather_16bit_weights_on_model_save``)."""
        return self.config.zero_optimization.stage3_gather_16bit_weights_on_model_save is True

    def _zero3_consolidated_16bit_state_dict(self, exclude_frozen_parameters: bool = False) -> dict[str, torch.Tensor]:
        """The whole ``state_dict`` in the training dtype on rank 0 (``{}`` on the others), gathered one module
        at a time at stage 3; every rank must call it (DeepSpeed's name, which Hugging Face calls)."""
        if isinstance(self.optimizer, zero_optim.ZeroStage3):
            state = self.optimizer.consolidated_state_dict()
        else:
            state = {k: v.detach().cpu() for k, v in self.module.state_dict().items()} if self.comm.rank == 0 else {}
        if exclude_frozen_parameters:
            frozen = {n for n, p in self.module.named_parameters() if not p.requires_grad}
            state = {k: v for k, v in state.items() if k not in frozen}
        return state

    def save_16bit_model(self, save_dir: str | Path, save_filename: str = "pytorch_model.bin",
                         exclude_frozen_parameters: bool = False) -> bool:
        """Rank 0 writes the model's whole ``state_dict`` in its training dtype to ``save_dir/save_filename``
        (every rank must call it). At stage 3 the weights are gathered one module at a time, and only
        when ``stage3_gather_16bit_weights_on_model_save`` is on; otherwise nothing is written and the
        result is False, as in DeepSpeed."""
        if isinstance(self.optimizer, zero_optim.ZeroStage3) and not self.zero_gather_16bit_weights_on_model_save():
            log_dist("save_16bit_model: nothing saved -- at stage 3 it needs zero_optimization."
                     "stage3_gather_16bit_weights_on_model_save: true (or use `zero ckpt export`)",
                     ranks=[0], level=logging.WARNING)  # every rank calls it: say it once
            return False
        state = self._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters)
        if self.comm.rank == 0:
            Path(save_dir).mkdir(parents=True, exist_ok=True)
            save_state_dict(state, Path(save_dir) / save_filename)  # fsynced, renamed into place
        self.comm.barrier()
        return True

    save_fp16_model = save_16bit_model  # DeepSpeed's older name
