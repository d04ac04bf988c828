"""``initialize`` and the training engine: a DeepSpeed config applied to a model, in order.

The engine is a short wiring of the parts, not a god object: the config picks the
update rule (the optimizer block; the CPU Adam when the optimizer is offloaded), the
store (device memory, pinned host memory or NVMe files), and the ZeRO optimizer
(stages 0-2: :class:`zero_optim.ZeroOptimizer`; stage 3: :class:`zero_optim.ZeroStage3`);
the engine keeps DeepSpeed's meaning of ``backward`` (every micro-batch) and ``step``
(called every micro-batch, stepping at each gradient-accumulation boundary), and saves
and loads through zero-ckpt.

Built so far: stages 0-3, fp32/bf16/fp16, gradient accumulation and clipping,
optimizer and parameter offload, optimizers named in the config (Adam, AdamW, Lion,
SGD, Lamb), checkpoints. Still to come (issue 9): LR schedulers, a client optimizer,
the pipeline engine, data loaders, monitoring.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

import zero_ckpt
import zero_comm
import zero_optim
from zero_offload import CPUAdam, HostStore, NVMeStore

from ._config import ConfigError, DeepSpeedConfig, load_config

__all__ = ["Engine", "initialize"]


def _rule(config: DeepSpeedConfig, offloaded: bool) -> Any:
    block = config.optimizer
    if block is None:
        raise ConfigError("optimizer: the config names no optimizer (a client optimizer is not supported yet)")
    params = {k: v for k, v in block.params.items() if v != "auto"}
    if "betas" in params:
        params["betas"] = tuple(params["betas"])
    kind = block.type.lower()
    if kind in ("adam", "adamw"):
        # DeepSpeed's "Adam" decouples weight decay unless adam_w_mode is false
        decoupled = kind == "adamw" or params.pop("adam_w_mode", True)
        params.pop("torch_adam", None)
        if offloaded:
            return CPUAdam(adamw_mode=bool(decoupled), **params)
        return (zero_optim.AdamW if decoupled else zero_optim.Adam)(**params)
    rules = {"lion": zero_optim.Lion, "sgd": zero_optim.SGD, "lamb": zero_optim.LAMB}
    if kind not in rules:
        raise ConfigError(f"optimizer.type: zero has Adam, AdamW, Lion, SGD and Lamb, got {block.type!r}")
    try:
        return rules[kind](**params)
    except TypeError as exc:
        raise ConfigError(f"optimizer.params: {exc}") from None


def _store(config: DeepSpeedConfig) -> Any:
    zero = config.zero_optimization
    offload = zero.offload_optimizer
    device = offload.device if offload is not None else ("cpu" if zero.cpu_offload else "none")
    param = zero.offload_param
    if param is not None and param.device == "nvme":
        device = "nvme"  # parameters and optimizer state share the NVMe store
    if device == "cpu":
        return HostStore(pin=offload.pin_memory if offload is not None else None)
    if device == "nvme":
        path = (offload.nvme_path if offload is not None and offload.nvme_path else None) or \
            (param.nvme_path if param is not None else None)
        if not path:
            raise ConfigError("zero_optimization.offload_optimizer.nvme_path: device 'nvme' needs an nvme_path")
        return NVMeStore(path, buffer_bytes=max(config.aio.block_size * 64, 1 << 30))
    return None


class Engine:
    """The model with its ZeRO optimizer; DeepSpeed's engine API."""

    def __init__(self, model: nn.Module, config: DeepSpeedConfig, comm: zero_comm.Communicator,
                 model_parameters: Iterable[Any] | None = None):
        self.config, self.comm, self.module = config, comm, model
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
            persistence_threshold=int(zero.stage3_param_persistence_threshold), offload_param=offload_param)
        rule = _rule(config, offloaded=store is not None)
        self.optimizer: zero_optim.ShardedOptimizer
        if zero.stage == 3:
            groups = list(model_parameters) if model_parameters is not None else None
            dict_groups = groups if groups and isinstance(groups[0], Mapping) else None
            self.optimizer = zero_optim.ZeroStage3(model, rule, comm=comm, config=zcfg, store=store,
                                                   param_groups=dict_groups)
        else:
            params: Any = model_parameters if model_parameters is not None else model.named_parameters()
            self.optimizer = zero_optim.ZeroOptimizer(params, rule, comm=comm, config=zcfg, store=store)
        self.store = store
        self.micro_steps = 0
        self.global_steps = 0
        self.skipped_steps = 0

    # -- DeepSpeed's engine API --------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    forward = __call__

    def train(self, mode: bool = True) -> Engine:
        self.module.train(mode)
        return self

    def eval(self) -> Engine:
        return self.train(False)

    def gradient_accumulation_steps(self) -> int:
        return int(self.config.gradient_accumulation_steps or 1)

    def train_batch_size(self) -> int:
        return int(self.config.train_batch_size or 0)

    def train_micro_batch_size_per_gpu(self) -> int:
        return int(self.config.train_micro_batch_size_per_gpu or 0)

    def is_gradient_accumulation_boundary(self) -> bool:
        """Whether the micro-batch now being processed is the last before an optimizer step."""
        return (self.micro_steps + 1) % self.gradient_accumulation_steps() == 0

    def backward(self, loss: torch.Tensor) -> torch.Tensor:
        """Back-propagate one micro-batch's loss (scaled for accumulation and fp16, as DeepSpeed does)."""
        self.optimizer.backward(loss)  # type: ignore[attr-defined]
        return loss

    def step(self) -> None:
        """Call after every micro-batch's backward; steps the optimizer at the accumulation boundary."""
        if self.is_gradient_accumulation_boundary():
            if self.optimizer.step():
                self.global_steps += 1
            else:
                self.skipped_steps += 1
        self.micro_steps += 1

    def get_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    # -- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self, save_dir: str | Path, tag: str | None = None, client_state: dict | None = None,
                        save_latest: bool = True) -> str:
        """Save the ZeRO state (every rank its shards) and ``client_state`` as ``save_dir/tag``."""
        tag = tag or f"global_step{self.global_steps}"
        state = {"client_state": client_state or {}, "global_steps": self.global_steps,
                 "micro_steps": self.micro_steps, "skipped_steps": self.skipped_steps}
        zero_ckpt.CheckpointManager(save_dir, self.comm).save(tag, {"optimizer": self.optimizer},
                                                              client_state=state)
        return tag

    def load_checkpoint(self, load_dir: str | Path, tag: str | None = None) -> tuple[str, dict]:
        """Load ``load_dir/tag`` (default: the latest); returns ``(path, client_state)``."""
        manager = zero_ckpt.CheckpointManager(load_dir, self.comm)
        state = manager.load({"optimizer": self.optimizer}, tag=tag)
        self.global_steps, self.micro_steps = state["global_steps"], state["micro_steps"]
        self.skipped_steps = state["skipped_steps"]
        loaded = tag or zero_ckpt.latest_tag(load_dir)
        return str(Path(load_dir) / str(loaded)), state["client_state"]


def initialize(args: Any = None, model: nn.Module | None = None, optimizer: Any = None,
               model_parameters: Iterable[Any] | None = None, training_data: Any = None,
               lr_scheduler: Any = None, config: Any = None, config_params: Any = None,
               dist_init_required: bool | None = None) -> tuple[Engine, Any, Any, Any]:
    """DeepSpeed's ``initialize``: returns ``(engine, optimizer, dataloader, lr_scheduler)``.

    ``config`` (or ``config_params``, or ``args.deepspeed_config``) is a ds_config dict or
    file. So far the optimizer comes from the config, there is no data loader and no
    scheduler (``None`` in their places); a client optimizer, training data or
    scheduler is refused rather than ignored.
    """
    if model is None:
        raise ValueError("initialize needs the model")
    for name, value in (("optimizer", optimizer), ("training_data", training_data), ("lr_scheduler", lr_scheduler)):
        if value is not None:
            raise NotImplementedError(f"initialize({name}=...) is not supported yet: name the optimizer in the "
                                      "config and drive data yourself")
    source = config if config is not None else config_params
    if source is None and args is not None:
        source = getattr(args, "deepspeed_config", None)
    if source is None:
        raise ConfigError("config: pass config=... (a dict or a ds_config file) or args.deepspeed_config")
    comm = zero_comm.init_distributed()
    dp = comm.world_size
    resolved = load_config(source).resolve(dp)
    engine = Engine(model, resolved, comm, model_parameters)
    return engine, engine.optimizer, None, None
