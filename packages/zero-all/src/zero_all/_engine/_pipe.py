"""The pipeline engine: ``initialize(model=PipelineModule(...))``, DeepSpeed's ``PipelineEngine`` API.

Applied in order: the world is cut into a (pipeline, data-parallel) grid, pipeline
stages outermost; zero-pipe's :class:`zero_pipe.PipelineEngine` runs the schedule on
this rank's stage over the pipeline group (and first makes the copies of each tied
layer equal); the ZeRO optimizer of stage 0 or 1 over the data-parallel group is the
training engine's (same config rules: update rule, precision, offload store); the
config's ``activation_checkpointing`` and ``pipeline`` blocks are applied.
``train_batch`` pulls ``gradient_accumulation_steps`` micro-batches, steps, and
returns their mean loss averaged over the data-parallel replicas.

Gradients go to the optimizer from hooks as backward produces them. A layer tied
across stages needs its gradients summed over those stages first, so its hook is
held off during the schedule and the summed gradient is handed to the optimizer
before the step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeGuard

import msgspec
import torch
from torch import nn

import zero_comm
import zero_pipe

from .._config import ConfigError, DeepSpeedConfig, load_config
from ..checkpointing import configure_from_config
from ._checkpoints import read_checkpoint, write_checkpoint
from ._info import EngineInfo
from ._state import no_custom_load
from ._training import Engine, model_hidden_size

__all__ = ["PipelineEngine", "is_pipeline"]


def is_pipeline(model: object) -> TypeGuard[zero_pipe.PipelineModule]:
    """Whether ``initialize`` runs ``model`` with the pipeline engine."""
    return isinstance(model, zero_pipe.PipelineModule)


class PipelineEngine(EngineInfo, nn.Module):
    """A :class:`zero_pipe.PipelineModule` with its ZeRO optimizer; DeepSpeed's pipeline engine API.

    An ``nn.Module`` holding this rank's stage as ``module`` (``parameters()``, ``state_dict()`` with
    ``module.`` prefixes, ``train()``/``eval()``), as DeepSpeed's engine is."""

    _stage: Engine  # this stage's training engine (its optimizer, scheduler, monitor and counters)

    def __init__(self, module: zero_pipe.PipelineModule, source: Any, world: zero_comm.Communicator,
                 model_parameters: Iterable[Any] | None = None, *, optimizer: Any = None, lr_scheduler: Any = None,
                 training_data: Any = None, collate_fn: Callable[..., Any] | None = None):
        nn.Module.__init__(self)
        pp = module.num_stages
        if world.world_size % pp:
            raise ValueError(f"a pipeline of {pp} stages cannot tile a world of {world.world_size} ranks")
        self.config = config = load_config(source).resolve(world.world_size // pp,
                                                           hidden_size=model_hidden_size(module))
        _apply_pipeline_block(module, config)
        configure_from_config(config)
        self.mesh = zero_comm.build_mesh(zero_comm.ParallelDims(world.world_size, pp=pp))
        if self.mesh.pp.rank != module.stage_id:
            raise ValueError(f"rank {world.rank} is stage {self.mesh.pp.rank} of the (pipeline, data) grid but its "
                             f"module was built as stage {module.stage_id}: build it with deepspeed.pipe."
                             "PipelineModule, which works its stage out")
        if not any(p.requires_grad for p in module.parameters()):
            raise ValueError(f"{module.describe_stage()} of {pp} has no parameter to train, so its optimizer "
                             "would have nothing to step: cut the layers differently (partition_method="
                             "'parameters', or fewer stages) or unfreeze some of its layers")
        self.world, self.module = world, module
        self.micro_batches = int(config.gradient_accumulation_steps or 1)
        self.pipe = zero_pipe.PipelineEngine(module, self.mesh.pp, micro_batches=self.micro_batches,
                                             schedule=getattr(module, "schedule", "1f1b"),
                                             dynamic_shapes=getattr(module, "dynamic_shape", False),
                                             optimizer=self,  # its step hands the tied gradients over first
                                             loss_scale=lambda: self.optimizer.loss_scale)  # fp16's; else 1
        # tied across stages: hold the optimizer's hooks off until the stages' gradients are summed
        self._tied = [p for params in module.tied_parameters().values() for p in params if p.requires_grad]
        # ...and held first by another stage: that stage's share of the gradient norm counts them
        self._tied_elsewhere = [p for key, params in module.tied_parameters().items() for p in params
                                if p.requires_grad and module.tie_holders[key][0] != module.stage_id]
        self._norm_overcount = 0.0
        self._stashed: dict[int, torch.Tensor | None] = {}
        self._handing_over = False
        hooks = [p.register_post_accumulate_grad_hook(self._hide) for p in self._tied]
        # the training engine of this stage, stepping once per batch: its optimizer (whose hooks go here),
        # client optimizer, LR scheduler, monitor and counters are the pipeline's
        whole_batch = msgspec.structs.replace(config, gradient_accumulation_steps=1,
                                              train_micro_batch_size_per_gpu=self.micro_batches * int(
                                                  config.train_micro_batch_size_per_gpu or 1))
        stage = Engine(module, whole_batch, self.mesh.dp, model_parameters, optimizer=optimizer,
                       lr_scheduler=lr_scheduler, collate_fn=collate_fn)
        object.__setattr__(self, "_stage", stage)  # not a submodule: `module` is this engine's only one
        self.dp_world_size = self.mesh.dp.world_size
        self.device = stage.device
        hooks += [p.register_post_accumulate_grad_hook(self._unhide) for p in self._tied]
        self._hooks = hooks
        if pp > 1:  # clip by, and skip on, the norm of the whole model's gradients
            stage.optimizer.whole_model_norm = self._whole_model_norm
        self.optimizer, self.lr_scheduler = stage.optimizer, stage.lr_scheduler
        self.data_iterator: Iterator[Any] | None = None
        self.training_dataloader: Any = None
        if training_data is not None:  # micro-batches over the data-parallel replicas, epoch after epoch
            self.training_dataloader = self._stage.deepspeed_io(
                training_data, batch_size=int(config.train_micro_batch_size_per_gpu or 1))
            self.set_dataiterator(_repeat(self.training_dataloader))

    @property
    def global_steps(self) -> int:
        return self._stage.global_steps

    @property
    def skipped_steps(self) -> int:
        return self._stage.skipped_steps

    # -- the hand-over of tied gradients ------------------------------------------------------------
    def _hide(self, p: torch.Tensor) -> None:
        if not self._handing_over:
            self._stashed[id(p)] = p.grad
            p.grad = None

    def _unhide(self, p: torch.Tensor) -> None:
        if not self._handing_over:
            p.grad = self._stashed.pop(id(p))

    def step(self) -> None:
        """Called by the schedule at its end (it is not DeepSpeed's user-facing ``step``, which a pipeline
        refuses): give the optimizer the summed tied gradients, then step."""
        ready = [(p, p.grad) for p in self._tied if p.grad is not None]
        self._norm_overcount = self._tied_norm_sq()
        self._handing_over = True
        try:
            for p, grad in ready:
                p.grad = None
                torch.autograd.backward([p], [grad])  # through the optimizer's hook, as backward would
        finally:
            self._handing_over = False
        self._stage.step()  # the optimizer, then the LR scheduler, as the training engine steps

    def _tied_norm_sq(self) -> float:
        """The squared norm of the data-parallel mean of the tied gradients whose first holder is another
        stage (every holder has the same summed gradient: the norm must count it once)."""
        grads = [p.grad.reshape(-1) for p in self._tied_elsewhere if p.grad is not None]
        if not grads:
            return 0.0
        flat = torch.cat(grads).float()
        if self.mesh.dp.world_size > 1:  # the optimizer's reduction is still to come
            self.mesh.dp.all_reduce(flat, "avg")
        return float(flat.square().sum())

    def _whole_model_norm(self, both: torch.Tensor) -> torch.Tensor:
        """``[sum of squares, non-finite]`` of this stage's gradients -> of the whole model's."""
        both = both.clone()
        both[0] -= self._norm_overcount
        self.mesh.pp.all_reduce(both)
        return both

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the optimizer's accumulated gradients (the schedule calls it after each step)."""
        self.optimizer.zero_grad()

    # -- DeepSpeed's pipeline API ---------------------------------------------------------------------
    def train_batch(self, data_iter: Iterable[Any] | None = None) -> torch.Tensor:
        """Run ``gradient_accumulation_steps`` micro-batches (``(inputs, labels)`` each, read by the first
        and last stage) forward and backward, step, and return their mean loss (averaged over the
        data-parallel replicas, the same on every rank)."""
        loss = self.pipe.train_batch(self._data(data_iter))
        return self._dp_mean(loss)

    def eval_batch(self, data_iter: Iterable[Any] | None = None, return_logits: bool = False,
                   compute_loss: bool = True, reduce_output: str | None = "avg", bcast_loss: bool = True,
                   num_micro_batches: int | None = None) -> torch.Tensor:
        """Forward ``gradient_accumulation_steps`` micro-batches without gradients; their mean loss."""
        for name, value, supported in (("return_logits", return_logits, False), ("compute_loss", compute_loss, True),
                                       ("reduce_output", reduce_output, "avg"), ("bcast_loss", bcast_loss, True)):
            if value != supported:
                raise NotImplementedError(f"eval_batch({name}={value!r}) is not supported; zero returns the mean "
                                          "loss on every rank")
        if num_micro_batches not in (None, self.micro_batches):
            raise NotImplementedError(f"eval_batch(num_micro_batches={num_micro_batches}): the engine runs "
                                      f"{self.micro_batches} (gradient_accumulation_steps)")
        return self._dp_mean(self.pipe.eval_batch(self._data(data_iter)))

    def set_dataiterator(self, iterator: Iterator[Any]) -> None:
        """The iterator ``train_batch()``/``eval_batch()`` read when given none."""
        self.data_iterator = iterator

    def _data(self, data_iter: Iterable[Any] | None) -> Iterable[Any] | None:
        data = data_iter if data_iter is not None else self.data_iterator
        if data is None and (self.is_first_stage() or self.is_last_stage()):
            raise ValueError("train_batch/eval_batch: pass data_iter (an iterator of (inputs, labels) "
                             "micro-batches) or call set_dataiterator() first")
        return iter(data) if data is not None and not isinstance(data, Iterator) else data

    def _dp_mean(self, loss: float) -> torch.Tensor:
        out = torch.tensor(loss, dtype=torch.float64)
        if self.mesh.dp.world_size > 1:
            self.mesh.dp.all_reduce(out, "avg")
        return out.float()

    @property
    def stage_id(self) -> int:
        return self.module.stage_id

    @property
    def num_stages(self) -> int:
        return self.module.num_stages

    def is_first_stage(self) -> bool:
        return self.module.stage_id == 0

    def is_last_stage(self) -> bool:
        return self.module.stage_id == self.module.num_stages - 1

    def gradient_accumulation_steps(self) -> int:
        return self.micro_batches

    def train_batch_size(self) -> int:
        return int(self.config.train_batch_size or 0)

    def train_micro_batch_size_per_gpu(self) -> int:
        return int(self.config.train_micro_batch_size_per_gpu or 0)

    def was_step_applied(self) -> bool:
        """Whether the last batch's step changed the weights (False: skipped, on every stage, for an
        inf/NaN gradient)."""
        return self._stage.was_step_applied()

    @property
    def global_samples(self) -> int:
        return self._stage.global_samples

    @property
    def monitor(self) -> Any:
        """The stage's training monitor (the log line, CSV and TensorBoard writers)."""
        return self._stage.monitor

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a pipeline engine runs whole batches: call train_batch() or eval_batch(), not "
                           "forward/backward/step")

    backward = forward

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """torch's, then the optimizer's fp32 master weights follow the loaded weights."""
        return self._stage.load_state_dict(state_dict, strict=strict, assign=assign)

    def destroy(self) -> None:
        self._stage.destroy()

    # -- checkpoints --------------------------------------------------------------------------------------
    def save_checkpoint(self, save_dir: str | Path, tag: str | None = None, client_state: dict | None = None,
                        save_latest: bool = True) -> bool:
        """Save every stage's ZeRO state (each rank its shards), its layers' buffers and untrained weights,
        the counters and scheduler, and ``client_state`` as ``save_dir/tag``, replacing an existing ``tag``
        atomically. Returns True."""
        return write_checkpoint(self._stage, self.module, self.world, save_dir, tag, client_state, save_latest)

    def load_checkpoint(self, load_dir: str | Path, tag: str | None = None, load_module_strict: bool = True,
                        load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                        load_module_only: bool = False, custom_load_fn: Callable[..., Any] | None = None
                        ) -> tuple[str | None, dict | None]:
        """Load ``load_dir/tag`` (default: the latest); returns ``(path, client_state)``, or ``(None, None)``
        when no tag is given and there is no checkpoint yet. The options mean what they mean for
        :meth:`Engine.load_checkpoint` (each stage loads the weights of its own layers; all or nothing
        over every stage)."""
        no_custom_load(custom_load_fn)
        return read_checkpoint(self._stage, self.module, self.world, load_dir, tag, whole_model=False,
                               strict=load_module_strict, optimizer_states=load_optimizer_states,
                               lr_scheduler_states=load_lr_scheduler_states, module_only=load_module_only)


def _repeat(loader: Iterable[Any]) -> Iterator[Any]:
    """``loader`` again and again (DeepSpeed's RepeatingLoader): a pipeline reads micro-batches across epochs."""
    while True:
        yield from loader


def _apply_pipeline_block(module: zero_pipe.PipelineModule, config: DeepSpeedConfig) -> None:
    """Check the config against the pipeline the module is, and apply what can still change."""
    zero, block = config.zero_optimization, config.pipeline
    if zero.stage > 1:
        raise ConfigError(f"zero_optimization.stage: pipeline parallelism runs with ZeRO stage 0 or 1 (as in "
                          f"DeepSpeed), got {zero.stage}")
    if block.stages not in ("auto", module.num_stages):
        raise ConfigError(f"pipeline.stages: the config says {block.stages}, the PipelineModule has "
                          f"{module.num_stages}")
    built = getattr(module, "partition_method", None)
    if block.partition not in ("best", built):
        raise ConfigError(f"pipeline.partition: the config asks {block.partition!r} but the module was cut "
                          f"{'by ' + repr(built) if built else 'with a method it does not record'}; the cut is "
                          "made when the PipelineModule is built: pass partition_method there")
    if block.seed_layers and not getattr(module, "seed_layers", False):
        raise ConfigError("pipeline.seed_layers: the layers are built when the PipelineModule is; pass "
                          "seed_layers=True there")
    interval = block.activation_checkpoint_interval
    own = module.activation_checkpoint_interval
    if interval and own and interval != own:
        raise ConfigError(f"pipeline.activation_checkpoint_interval: the config says {interval}, the "
                          f"PipelineModule {own}")
    if interval:
        module.activation_checkpoint_interval = interval
