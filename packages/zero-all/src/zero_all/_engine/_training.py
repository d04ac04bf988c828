"""``initialize`` and the training engine: a DeepSpeed config applied to a model, in order.

The engine is a short wiring of the parts, not a god object: the config (or a client
optimizer) picks the update rule, the store (device memory, pinned host memory or
NVMe files), and the ZeRO optimizer (stages 0-2: :class:`zero_optim.ZeroOptimizer`;
stage 3: :class:`zero_optim.ZeroStage3`); the engine keeps DeepSpeed's meaning of
``backward`` (every micro-batch) and ``step`` (called every micro-batch, stepping the
optimizer, then the LR scheduler, at each gradient-accumulation boundary), and saves
and loads through zero-ckpt.

Built: stages 0-3, fp32/bf16/fp16, gradient accumulation and clipping, optimizer and
parameter offload, optimizers named in the config (Adam, AdamW, Lion, SGD, Lamb) or
given as a client torch optimizer (:mod:`._optim`), LR schedulers from the config or
the client (:mod:`._lr`), data loaders over the data-parallel ranks
(``deepspeed_io``), progress lines, CSV/TensorBoard monitors and wall-clock
breakdowns (:mod:`._monitor`), checkpoints with the scheduler's state (loaded whole, or the
weights alone), and what scripts read off DeepSpeed's engine (:class:`EngineInfo`; the
engine is an ``nn.Module`` over the model, as DeepSpeed's is).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

import zero_comm
import zero_optim
from zero_offload import HostStore, NVMeStore

from .._config import ConfigError, DeepSpeedConfig
from ._checkpoints import EngineCheckpoints, check_node_local_storage
from ._info import EngineInfo, NoOptimizer
from ._lr import build_scheduler
from ._moe import expert_comms
from ._monitor import TrainingMonitor
from ._optim import TorchOptimizerView, rule_from_client, rule_from_config
from ._zeropp import hpz_group, zeropp_options

__all__ = ["DeepSpeedEngine", "Engine", "model_hidden_size"]


def _store(config: DeepSpeedConfig) -> Any:
    zero = config.zero_optimization
    offload = zero.offload_optimizer
    device = offload.device if offload is not None else ("cpu" if zero.cpu_offload else "none")
    param = zero.offload_param
    if param is not None and param.device == "nvme":
        device = "nvme"  # parameters and optimizer state share the NVMe store
    if device == "cpu":
        # pinning speeds copies to an accelerator; without one there is nothing to pin for (DeepSpeed's
        # CPU accelerator ignores it too), so a config written for GPUs runs here unchanged
        pin = offload is not None and offload.pin_memory and torch.cuda.is_available()
        return HostStore(pin=pin)
    if device == "nvme":
        path = (offload.nvme_path if offload is not None and offload.nvme_path else None) or \
            (param.nvme_path if param is not None else None)
        if not path:
            raise ConfigError("zero_optimization.offload_optimizer.nvme_path: device 'nvme' needs an nvme_path")
        return NVMeStore(path, buffer_bytes=max(config.aio.block_size * 64, 1 << 30))
    return None


class Engine(EngineInfo, EngineCheckpoints, nn.Module):
    """The model with its ZeRO optimizer; DeepSpeed's engine API.

    ``optimizer`` is a client optimizer (a torch optimizer, a callable making one from the
    parameters, or a zero update rule); ``lr_scheduler`` a scheduler, or a callable making
    one from :attr:`basic_optimizer`, DeepSpeed's contract for both.

    As DeepSpeed's engine it is an ``nn.Module`` holding the model as ``module``: its
    ``parameters()``, ``named_modules()``, ``state_dict()`` (keys prefixed ``module.``),
    ``train()``/``eval()`` and forward hooks are the torch ones over that.
    """

    def __init__(self, model: nn.Module, config: DeepSpeedConfig, comm: zero_comm.Communicator,
                 model_parameters: Iterable[Any] | None = None, *, optimizer: Any = None, lr_scheduler: Any = None,
                 collate_fn: Callable[..., Any] | None = None):
        nn.Module.__init__(self)
        _to_local_device(model, comm)
        self.config, self.comm, self.module = config, comm, model
        self.dp_world_size = comm.world_size
        self._no_sync = False
        self._boundary: bool | None = None  # set_gradient_accumulation_boundary's override
        self.collate_fn = collate_fn
        zero = config.zero_optimization
        precision: Literal["fp32", "bf16", "fp16"] = (
            "bf16" if config.bf16.enabled is True else "fp16" if config.fp16.enabled is True else "fp32")
        fp16 = config.fp16
        loss_scale = zero_optim.LossScaleConfig(
            initial_scale_power=fp16.initial_scale_power, window=fp16.loss_scale_window,
            hysteresis=fp16.hysteresis, consecutive_hysteresis=fp16.consecutive_hysteresis,
            min_scale=fp16.min_loss_scale, static_scale=fp16.loss_scale)
        offload_param = zero.offload_param is not None and zero.offload_param.device != "none"
        store = _store(config)
        zcfg = zero_optim.ZeroConfig(
            stage=zero.stage, precision=precision, accumulation_steps=int(config.gradient_accumulation_steps or 1),
            clip_grad_norm=float(config.gradient_clipping) or None, loss_scale=loss_scale,
            overlap_comm=zero.overlap_comm if zero.overlap_comm is not None else True,
            bucket_numel=int(zero.reduce_bucket_size), prefetch_numel=int(zero.stage3_prefetch_bucket_size),
            max_live_numel=int(zero.stage3_max_live_parameters),
            persistence_threshold=int(zero.stage3_param_persistence_threshold), offload_param=offload_param,
            granularity_threshold=int(zero.stage3_module_granularity_threshold),
            **zeropp_options(zero, comm.world_size))
        client = optimizer
        if callable(client):  # DeepSpeed: a callable makes the optimizer from the parameters
            client = client(model_parameters if model_parameters is not None else model.parameters())
        if client is not None and config.optimizer is not None:
            raise ConfigError(f"optimizer: the config names {config.optimizer.type!r} and initialize was given "
                              f"one too ({type(client).__name__}); keep one")
        check_node_local_storage(config)
        self.trains = client is not None or config.optimizer is not None  # DeepSpeed: no optimizer, evaluation
        if client is not None:
            rule, groups = rule_from_client(client)
        elif self.trains:
            rule, groups = rule_from_config(config), None
        else:
            rule, groups = zero_optim.SGD(lr=0.0), None  # never steps: stage 3 only partitions and gathers
        names = {p: n for n, p in model.named_parameters()}
        experts = expert_comms(model, comm, zero.stage)  # MoE experts: reduced over their own ranks
        self.optimizer: zero_optim.ShardedOptimizer
        if zero.stage == 3:
            given = groups if groups is not None else (list(model_parameters) if model_parameters is not None
                                                        else None)
            dict_groups = given if given and isinstance(given[0], Mapping) else None
            if groups is not None:
                _check_all_in_groups(model, groups)
            self.optimizer = zero_optim.ZeroStage3(model, rule, comm=comm, config=zcfg, store=store,
                                                   param_groups=dict_groups, train=self.trains,
                                                   hpz_comm=hpz_group(zero, comm))
        elif not self.trains:
            self.optimizer = NoOptimizer()  # type: ignore[assignment]
        else:
            params: Any = groups if groups is not None else (
                model_parameters if model_parameters is not None else model.named_parameters())
            self.optimizer = zero_optim.ZeroOptimizer(params, rule, comm=comm, config=zcfg, store=store,
                                                      names=names, expert_comms=experts)
        if precision != "fp32":
            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            _cast_floating_state(model, dtype, frozen_params=zero.stage < 3)
        self.store = store
        self.basic_optimizer: TorchOptimizerView = (
            TorchOptimizerView(self.optimizer, client) if self.trains else None)  # type: ignore[assignment]  # what torch's schedulers act on
        self.lr_scheduler = self._scheduler(lr_scheduler, client)
        self.device = next(model.parameters()).device
        self.monitor = TrainingMonitor(config, comm, self.device)
        self.training_dataloader: DataLoader | None = None
        self.micro_steps = 0
        self.global_steps = 0
        self.global_samples = 0
        self.skipped_steps = 0

    def _needs_optimizer(self, what: str) -> None:
        if not self.trains:
            raise RuntimeError(f"engine.{what}(): this engine was initialized without an optimizer (none given, none "
                               "in the config), so it only runs forward (evaluation, inference); add an \"optimizer\" "
                               "block to the config or pass optimizer=... to train")

    def _scheduler(self, given: Any, client: Any) -> Any:
        """The config's scheduler block, or the client's scheduler (adopted onto this optimizer) or callable."""
        if given is not None and self.config.scheduler is not None:
            raise ConfigError(f"scheduler: the config names {self.config.scheduler.type!r} and initialize was "
                              f"given lr_scheduler={type(given).__name__} too; keep one")
        if not self.trains:
            return None  # nothing to schedule (DeepSpeed drops the scheduler of an evaluation-only engine too)
        if given is None:
            block = self.config.scheduler
            return None if block is None else build_scheduler(block.type, block.params, self.basic_optimizer)
        if callable(given):
            return given(self.basic_optimizer)
        scheduled = getattr(given, "optimizer", None)
        if scheduled is None or scheduled is self.basic_optimizer:
            return given
        if client is None or scheduled is not client:
            raise ValueError(f"initialize(lr_scheduler=...): the scheduler drives an optimizer "
                             f"({type(scheduled).__name__}) other than the one given to initialize; pass that "
                             "optimizer as optimizer=..., or pass a callable f(optimizer) -> scheduler")
        # the client's optimizer becomes a ZeRO one: the scheduler's group entries (initial_lr, ...) move over
        for ours, theirs in zip(self.basic_optimizer.param_groups, client.param_groups, strict=True):
            for key, value in theirs.items():
                if key != "params" and key not in ours:
                    ours[key] = value
        given.optimizer = self.basic_optimizer
        return given

    # -- DeepSpeed's engine API --------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.module.training:
            self.monitor.saw_inputs(args, kwargs)
        if self.config.fp16.enabled is True and self.config.fp16.auto_cast:
            args, kwargs = _to_half(args), _to_half(kwargs)
        with self.monitor.timed("forward"):
            return self.module(*args, **kwargs)

    def gradient_accumulation_steps(self) -> int:
        return int(self.config.gradient_accumulation_steps or 1)

    def train_batch_size(self) -> int:
        return int(self.config.train_batch_size or 0)

    def train_micro_batch_size_per_gpu(self) -> int:
        return int(self.config.train_micro_batch_size_per_gpu or 0)

    def is_gradient_accumulation_boundary(self) -> bool:
        """Whether the micro-batch now being processed is the last before an optimizer step: every
        ``gradient_accumulation_steps``-th, or as :meth:`set_gradient_accumulation_boundary` said."""
        if self._boundary is not None:
            return self._boundary
        return (self.micro_steps + 1) % self.gradient_accumulation_steps() == 0

    def set_gradient_accumulation_boundary(self, is_boundary: bool) -> None:
        """Say from now on whether each micro-batch ends the accumulation, instead of counting them:
        ``False`` before the first ones, ``True`` before the last, then one ``step()`` (DeepSpeed's
        contract). The loss is still divided by ``gradient_accumulation_steps``."""
        self._boundary = bool(is_boundary)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward inside the block keeps the gradients on this rank; the next backward outside it
        reduces them all (a step inside is an error). ZeRO stages 2 and 3 reduce each micro-batch's
        gradients into their partitions as backward makes them, so they refuse it, as in DeepSpeed."""
        stage = self.zero_optimization_stage()
        if stage >= 2:
            raise RuntimeError(f"no_sync: ZeRO stage {stage} partitions the gradients of every micro-batch as "
                               "backward makes them, so it cannot skip their reduction; accumulate with "
                               "gradient_accumulation_steps, or use stage 0 or 1")
        if self._no_sync:
            raise RuntimeError("no_sync: the block is already open (it cannot be re-entered)")
        self._no_sync = True
        try:
            yield
        finally:
            self._no_sync = False

    def backward(self, loss: torch.Tensor, allreduce_gradients: bool = True, release_loss: bool = False,
                 retain_graph: bool = False, scale_wrt_gas: bool = True) -> torch.Tensor:
        """Back-propagate one micro-batch's loss (scaled for fp16, and divided by the accumulation steps
        unless ``scale_wrt_gas`` is false: the caller already did, as Hugging Face's Trainer does); at the
        accumulation boundary (outside ``no_sync``) the gradients' reduction starts. DeepSpeed's
        ``allreduce_gradients``/``release_loss`` are accepted; only ``allreduce_gradients=False`` (use
        ``no_sync``) is refused."""
        if not allreduce_gradients:
            raise NotImplementedError("backward(allreduce_gradients=False): use `with engine.no_sync():` to keep "
                                      "gradients local for a micro-batch")
        del release_loss
        self._needs_optimizer("backward")
        self.monitor.saw_loss(loss)
        boundary = self.is_gradient_accumulation_boundary() and not self._no_sync
        with self.monitor.timed("backward"):
            self.optimizer.backward(loss, boundary=boundary, scale_wrt_gas=scale_wrt_gas,  # type: ignore[attr-defined]
                                    retain_graph=retain_graph)
        return loss

    def step(self, lr_kwargs: dict[str, Any] | None = None) -> None:
        """Call after every micro-batch's backward. At the accumulation boundary: the optimizer step,
        then (unless the step was skipped for inf/NaN gradients) ``lr_scheduler.step(**lr_kwargs)``.
        As in DeepSpeed, ``global_steps`` counts skipped steps too; ``skipped_steps`` counts those."""
        if self._no_sync:
            raise RuntimeError("step() inside no_sync: leave the block and run the last backward first")
        self._needs_optimizer("step")
        boundary = self.is_gradient_accumulation_boundary()
        if boundary:
            with self.monitor.timed("step"):
                self.basic_optimizer.step()
                if not self.basic_optimizer.last_step_applied:
                    self.skipped_steps += 1
                elif self.lr_scheduler is not None:
                    self.lr_scheduler.step(**(lr_kwargs or {}))
            self.global_steps += 1
            self.global_samples += self.train_batch_size()
            scaler = self.optimizer.scaler
            self.monitor.after_step(step=self.global_steps, samples=self.global_samples,
                                    batch=self.train_batch_size(), lrs=self.get_lr(),
                                    loss_scale=scaler.scale if scaler else 1.0, skipped=self.skipped_steps)
        self.micro_steps += 1

    def was_step_applied(self) -> bool:
        """Whether the last optimizer step changed the weights (False: skipped for inf/NaN gradients)."""
        return self.basic_optimizer.last_step_applied

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """torch's, then the optimizer's fp32 master weights are set from the loaded weights (else the
        next step would put the old ones back). Stages 0-2; every rank loads the same state."""
        if not isinstance(self.optimizer, zero_optim.ZeroOptimizer):
            raise NotImplementedError("load_state_dict at ZeRO stage 3: the parameters are partitioned; load "
                                      "through load_checkpoint, or change them inside deepspeed.zero."
                                      "GatheredParameters(params, modifier_rank=0)")
        if assign:
            raise ValueError("load_state_dict(assign=True) would take the parameters out of the ZeRO "
                             "optimizer's buffers; load by copying (assign=False)")
        result = super().load_state_dict(state_dict, strict=strict)
        self.optimizer.refresh_master_weights()
        return result

    def destroy(self) -> None:
        """Release what the engine holds outside the process's memory: monitor files are flushed and an
        NVMe store's swap files removed, the progress bar erased. The engine cannot train afterwards."""
        self.monitor.close()
        for writer in self.monitor.writers:
            writer.flush()
        close = getattr(self.store, "close", None)
        if close is not None:
            close()

    # -- data ---------------------------------------------------------------------------------
    def deepspeed_io(self, dataset: Dataset, batch_size: int | None = None, route: str = "train",
                     pin_memory: bool = True, data_sampler: Any = None,
                     collate_fn: Callable[..., Any] | None = None, num_local_io_workers: int | None = None
                     ) -> DataLoader:
        """A loader of ``dataset`` for this rank: micro-batches of ``train_micro_batch_size_per_gpu``
        (or ``batch_size``) drawn by a :class:`DistributedSampler` over the data-parallel ranks, so
        the ranks see disjoint samples (shuffled for ``route="train"``, seeded by the config's
        ``seed``; call ``loader.sampler.set_epoch(epoch)`` each epoch). An ``IterableDataset``
        is iterated as it is: it must split itself over the ranks."""
        if not isinstance(dataset, Dataset):
            raise ValueError(f"training data must be a torch Dataset, got {type(dataset).__name__}")
        if data_sampler is None and not isinstance(dataset, IterableDataset):
            data_sampler = DistributedSampler(dataset, num_replicas=self.comm.world_size, rank=self.comm.rank,
                                              shuffle=route == "train", seed=self.config.seed or 0)
        return DataLoader(dataset, batch_size=batch_size or self.train_micro_batch_size_per_gpu(),
                          sampler=data_sampler, collate_fn=collate_fn or self.collate_fn,
                          num_workers=num_local_io_workers or 0,
                          pin_memory=pin_memory and self.device.type == "cuda")

DeepSpeedEngine = Engine  # DeepSpeed's name, for isinstance checks


def _to_half(item: Any) -> Any:
    """``item`` with every floating-point tensor in it (through tuples, lists and dicts) cast to fp16."""
    if torch.is_tensor(item):
        return item.half() if item.is_floating_point() else item
    if isinstance(item, (tuple, list)):
        return type(item)(_to_half(v) for v in item)
    if isinstance(item, dict):
        return {k: _to_half(v) for k, v in item.items()}
    return item


def _to_local_device(model: nn.Module, comm: zero_comm.Communicator) -> None:
    """Like DeepSpeed's engine, train on this rank's accelerator: a model built on the CPU moves to
    the rank's GPU when the job runs on NCCL (a model partitioned by zero.Init stays where it was built)."""
    partitioned = any(isinstance(p, zero_optim.PartitionedParameter) for p in model.parameters())
    if getattr(comm, "backend", "") != "nccl" or partitioned:
        return
    device = torch.device("cuda", torch.cuda.current_device())
    if any(p.device != device for p in model.parameters()):
        model.to(device)


def _cast_floating_state(model: nn.Module, dtype: torch.dtype, *, frozen_params: bool) -> None:
    """What DeepSpeed's ``module.half()``/``bfloat16()`` does beyond the trained weights, which the
    optimizer casts: floating-point buffers (a BatchNorm's running statistics) and, with
    ``frozen_params``, the weights nothing trains (stage 3 partitions, and casts, those itself)."""
    with torch.no_grad():
        for module in model.modules():
            for name, buf in module._buffers.items():
                if buf is not None and buf.is_floating_point() and buf.dtype != dtype:
                    module._buffers[name] = buf.to(dtype)
            if frozen_params:
                for p in module.parameters(recurse=False):
                    if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                        p.data = p.data.to(dtype)


def model_hidden_size(model: nn.Module) -> int | None:
    """The hidden size ``"auto"`` bucket sizes follow, from a Hugging Face-style ``model.config``
    (``hidden_size``, or the largest of ``hidden_sizes``), as DeepSpeed's HF integration reads it."""
    config = getattr(model, "config", None)
    size = getattr(config, "hidden_size", None)
    if isinstance(size, int):
        return size
    sizes = getattr(config, "hidden_sizes", None)
    return max(sizes) if isinstance(sizes, (list, tuple)) and sizes else None


def _check_all_in_groups(model: nn.Module, groups: list[dict[str, Any]]) -> None:
    """Stage 3 trains every parameter of the module: a client optimizer must hold them all."""
    held = {id(p) for g in groups for p in g["params"]}
    left = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
    if left:
        raise ValueError(f"initialize(optimizer=...): stage 3 trains every parameter of the model, but the optimizer "
                         f"does not hold {', '.join(left[:3])}{' ...' if len(left) > 3 else ''} (set "
                         "requires_grad=False on what should not train)")
