"""``deepspeed.zero``: partitioned construction (``Init``) and ``GatheredParameters`` for ZeRO stage 3.

``Init`` is :func:`zero_optim.partitioned` with DeepSpeed's arguments: every
parameter built inside the block is partitioned across the data-parallel ranks as
soon as its module's ``__init__`` returns (no module class or torch function is
patched), so the model never exists whole on any rank; hand it to ``initialize``
with a stage-3 config. ``GatheredParameters`` is :func:`zero_optim.gathered`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from types import TracebackType
from typing import Any

import torch
from torch import nn

import zero_comm
import zero_optim

from ._config import ConfigError, DeepSpeedConfig, load_config

__all__ = ["GatheredParameters", "Init", "check_partitioned_model", "register_external_parameter",
           "unregister_external_parameter"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Init:
    """Build a model partitioned across the data-parallel ranks (DeepSpeed's ``zero.Init``)::

        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = MyLargeModel()

    Every rank must build the same model; each parameter takes rank 0's initial values.
    ``module=`` partitions an already built model at once instead. ``data_parallel_group``
    (or ``mpu.get_data_parallel_group()``) is the process group to partition across
    (default: the world). ``dtype`` casts the shards (fp32, fp16 or bf16); by default the
    config's precision (bf16/fp16 when enabled), else each parameter keeps its own.
    ``remote_device`` is where DeepSpeed stores the shards: parameters are built on the
    local device (the CUDA device of this rank where there is one, else the CPU); ``"cpu"``
    and ``"nvme"`` are honoured by the engine through the config's
    ``zero_optimization.offload_param``, so they must agree with it (or, for ``"cpu"``,
    the local device must be the CPU). ``pin_memory`` needs such an offload.
    ``mem_efficient_linear`` changes nothing: stage 3 gathers a module's weights for its
    backward, so ``F.linear`` needs no replacement. ``enabled=False`` makes it a no-op.
    """

    def __init__(self, module: nn.Module | None = None, data_parallel_group: Any = None,
                 mem_efficient_linear: bool = True, remote_device: str | None = None, pin_memory: bool = False,
                 config_dict_or_path: Any = None, config: Any = None, enabled: bool = True,
                 dtype: torch.dtype | None = None, mpu: Any = None, zero_param_parallel_group: Any = None,
                 zero_quantized_weights: bool = False, zero_quantized_nontrainable_weights: bool = False,
                 sequence_data_parallel_group: Any = None, param_swapper: Any = None,
                 tensor_overrides: Any = None):
        del mem_efficient_linear
        self.enabled = enabled
        self._stack: contextlib.ExitStack | None = None
        if not enabled:
            return
        for name, value in (("zero_param_parallel_group", zero_param_parallel_group), ("param_swapper", param_swapper),
                            ("tensor_overrides", tensor_overrides)):
            if value is not None:
                raise NotImplementedError(f"zero.Init({name}=...) is not supported: zero partitions over one "
                                          "data-parallel group and swaps through the config's offload_param")
        if zero_quantized_weights or zero_quantized_nontrainable_weights:
            raise NotImplementedError("zero.Init(zero_quantized_weights=True) is not supported: zero does not have "
                                      "ZeRO++ quantised weights yet")
        if config is not None and config_dict_or_path is not None:
            raise ValueError("zero.Init: pass config_dict_or_path (config is its deprecated name), not both")
        source = config_dict_or_path if config_dict_or_path is not None else config
        ds_config = load_config(source) if source is not None else None
        if ds_config is not None and ds_config.zero_optimization.stage != 3:
            raise ConfigError(f"zero_optimization.stage: zero.Init builds a model partitioned for stage 3; this "
                              f"config has stage {ds_config.zero_optimization.stage}")
        self.dtype = _dtype(dtype, ds_config)
        group = data_parallel_group if data_parallel_group is not None else sequence_data_parallel_group
        if data_parallel_group is not None and sequence_data_parallel_group is not None:
            raise ValueError("zero.Init: pass data_parallel_group or sequence_data_parallel_group, not both")
        if group is None and mpu is not None:
            group = mpu.get_data_parallel_group()
        world = zero_comm.init_distributed()
        self.comm: zero_comm.ProcessGroupCommunicator = (
            world if group is None else zero_comm.ProcessGroupCommunicator(group, name="zero.Init"))
        self.local_device = (torch.device("cuda", zero_comm.detect_launch_env().local_rank % torch.cuda.device_count())
                             if torch.cuda.is_available() else torch.device("cpu"))
        _check_remote_device(remote_device, pin_memory, ds_config, self.local_device)
        if module is not None:
            partition_module(module, self.comm, self.dtype)

    def __enter__(self) -> Init:
        if not self.enabled:
            return self
        if self._stack is not None:
            raise RuntimeError("this zero.Init block is already open; nest a new zero.Init(...) instead")
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(self.local_device)
        self._stack.enter_context(zero_optim.partitioned(self.comm, dtype=self.dtype))
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.__exit__(kind, exc, tb)


def _dtype(dtype: torch.dtype | None, config: DeepSpeedConfig | None) -> torch.dtype | None:
    if dtype is None and config is not None:
        dtype = (torch.bfloat16 if config.bf16.enabled is True else
                 torch.float16 if config.fp16.enabled is True else None)
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"zero.Init(dtype={dtype}): partitioned parameters are float32, float16 or bfloat16")
    return dtype


def _check_remote_device(remote_device: str | None, pin_memory: bool, config: DeepSpeedConfig | None,
                         local: torch.device) -> None:
    offload = config.zero_optimization.offload_param if config is not None else None
    offloaded = offload.device if offload is not None else "none"
    if remote_device in (None, "none"):
        remote_device = offloaded if offloaded != "none" else None
    if remote_device not in (None, "cpu", "nvme"):
        if torch.device(remote_device).type != local.type:
            raise ValueError(f"zero.Init(remote_device={remote_device!r}): this rank builds on {local}; shards stay "
                             "on the local device unless the config offloads them (offload_param)")
        remote_device = None
    if (remote_device == "nvme" or (remote_device == "cpu" and local.type != "cpu")) and offloaded != remote_device:
        raise ConfigError(f"zero.Init(remote_device={remote_device!r}): zero offloads parameter shards when the "
                          f"engine is built, from zero_optimization.offload_param; set its device to "
                          f"{remote_device!r} and pass that config as config_dict_or_path")
    if pin_memory and remote_device not in ("cpu", "nvme"):
        raise ValueError("zero.Init(pin_memory=True) needs remote_device='cpu' or 'nvme' (pinned host memory holds "
                         "offloaded shards)")


def partition_module(module: nn.Module, comm: zero_comm.Communicator, dtype: torch.dtype | None = None) -> None:
    """Partition an already built ``module``'s parameters over ``comm`` (``zero.Init(module=...)``)."""
    for name, p in list(module.named_parameters()):  # named by path; a shared parameter once
        if not isinstance(p, zero_optim.PartitionedParameter):
            zero_optim.GatherUnit([p], comm, dtype, names=[name])


def check_partitioned_model(model: nn.Module, config: DeepSpeedConfig) -> None:
    """Refuse a model built under ``zero.Init`` for a config that is not stage 3."""
    if config.zero_optimization.stage != 3 and any(
            isinstance(p, zero_optim.PartitionedParameter) for p in model.parameters()):
        raise ConfigError(f"zero_optimization.stage: the model was built under zero.Init (its parameters are "
                          f"partitioned), which needs stage 3; this config has stage "
                          f"{config.zero_optimization.stage}")


class GatheredParameters:
    """Make partitioned parameters whole inside the block (DeepSpeed's ``zero.GatheredParameters``).

    Every rank must enter it. With ``modifier_rank`` the block may change the
    parameters and that rank's values are broadcast and re-partitioned on exit (a
    training engine's master weights follow); with ``None`` changes are dropped.
    ``fwd_module`` marks parameters used inside the forward of a module that does not
    own them: when a ZeRO stage-3 engine runs the model, it already fetches such a
    parameter on use and gathers it with that module from then on (for its backward
    too), so the block leaves the gathering to it. Parameters that are not
    partitioned pass through; ``enabled=False`` makes it a no-op.
    """

    def __init__(self, params: torch.Tensor | Iterable[torch.Tensor], modifier_rank: int | None = None,
                 fwd_module: nn.Module | None = None, enabled: bool = True):
        items = [params] if isinstance(params, torch.Tensor) else list(params) if enabled else []
        partitioned = [p for p in items if isinstance(p, zero_optim.PartitionedParameter)]
        run_by_engine = bool(partitioned) and all(p.zero.unit.on_released_use is not None for p in partitioned)
        self._context: contextlib.AbstractContextManager[Any] = (
            contextlib.nullcontext() if not enabled or not partitioned or (fwd_module is not None and run_by_engine)
            else zero_optim.gathered(partitioned, modifier_rank=modifier_rank))
        if modifier_rank is not None and partitioned:
            world = partitioned[0].zero.unit.comm.world_size
            if not 0 <= modifier_rank < world:
                raise ValueError(f"GatheredParameters(modifier_rank={modifier_rank}): the parameters are partitioned "
                                 f"over {world} ranks")

    def __enter__(self) -> None:
        self._context.__enter__()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._context.__exit__(kind, exc, tb)


def register_external_parameter(module: nn.Module, parameter: nn.Parameter) -> None:
    """DeepSpeed's way to tell stage 3 that ``module``'s forward uses ``parameter``, which another
    module owns (a tied embedding read by the output layer). Nothing to do here: a stage-3 engine
    fetches such a parameter when it is used, remembers where, and from the next step gathers it
    with ``module`` (for its backward too). The arguments are checked, so a wrong call still fails."""
    _check_external(module, parameter, "register_external_parameter")


def unregister_external_parameter(module: nn.Module, parameter: nn.Parameter) -> None:
    """The inverse of :func:`register_external_parameter`: nothing to undo (the arguments are checked)."""
    _check_external(module, parameter, "unregister_external_parameter")


def _check_external(module: Any, parameter: Any, name: str) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(f"{name}(module, parameter): module must be an nn.Module, got {type(module).__name__}")
    if not isinstance(parameter, nn.Parameter):
        raise TypeError(f"{name}(module, parameter): parameter must be an nn.Parameter, got "
                        f"{type(parameter).__name__}")
