"""DeepSpeed's inference config (``init_inference(model, config=None, **kwargs)``) as a strict Struct.

The keys and defaults are DeepSpeed's ``DeepSpeedInferenceConfig``: a dict, a JSON
file and keyword arguments all work, with DeepSpeed's aliases (``mp_size``,
``kernel_inject``, ``tp``, ``max_tokens``, ...). A key zero does not know is refused
naming the nearest one; a feature DeepSpeed has that zero's inference does not
(MoE inference, custom injection policies, saving a tensor-parallel checkpoint) is
refused by name unless left at its default; nothing is silently dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec
import torch

from .._config import ConfigError, OffloadConfig
from .._config._schema import _Block, _check, _explain, _read  # the same strict Struct checks

__all__ = ["InferenceConfig", "load_inference_config"]

DTYPES: dict[str, torch.dtype] = {}
for _dtype, _names in ((torch.float16, ("torch.float16", "fp16", "float16", "half", "torch.half")),
                       (torch.bfloat16, ("torch.bfloat16", "bf16", "bfloat16")),
                       (torch.float32, ("torch.float32", "fp32", "float32", "float", "torch.float")),
                       (torch.int8, ("torch.int8", "int8"))):
    DTYPES.update(dict.fromkeys(_names, _dtype))

ALIASES = {"kernel_inject": "replace_with_kernel_inject", "tp": "tensor_parallel", "max_tokens": "max_out_tokens",
           "min_tokens": "min_out_tokens", "ckpt_config": "checkpoint_config", "injection_dict": "injection_policy",
           "args": "config", "tm": "triangular_masking"}
OBJECTS = ("mpu", "tp_group", "injection_policy", "injection_policy_tuple", "ep_group", "ep_mp_group")


class TensorParallelConfig(_Block):
    enabled: bool = True
    tp_size: int = 1
    tp_grain_size: int = 1


class WeightQuantConfig(_Block):
    enabled: bool = True
    num_bits: int = 8
    q_type: Literal["symmetric"] = "symmetric"
    q_groups: int = 1
    group_size: int = 64  # zero's: elements per scale


class QuantConfig(_Block):
    enabled: bool = True
    weight: WeightQuantConfig = msgspec.field(default_factory=WeightQuantConfig)
    activation: dict[str, Any] = msgspec.field(default_factory=dict)
    qkv: dict[str, Any] = msgspec.field(default_factory=dict)


class ZeroInferenceConfig(_Block):
    stage: int = 0
    offload_param: OffloadConfig | None = None


class InferenceConfig(_Block):
    replace_with_kernel_inject: bool = False
    dtype: str = "torch.float16"
    tensor_parallel: TensorParallelConfig = msgspec.field(default_factory=TensorParallelConfig)
    enable_cuda_graph: bool = False
    use_triton: bool = False
    triton_autotune: bool = False
    zero: ZeroInferenceConfig = msgspec.field(default_factory=ZeroInferenceConfig)
    triangular_masking: bool = True
    moe: bool | dict[str, Any] = False
    keep_module_on_host: bool = False
    quant: QuantConfig | None = None
    checkpoint: str | dict[str, Any] | None = None
    base_dir: str = ""
    set_empty_params: bool = False
    save_mp_checkpoint_path: str | None = None
    checkpoint_config: dict[str, Any] = msgspec.field(default_factory=dict)
    return_tuple: bool = True
    training_mp_size: int = 1
    replace_method: str = "auto"
    config: dict[str, Any] | None = None
    max_out_tokens: int = 1024
    min_out_tokens: int = 1
    transposed_mode: bool = False
    mp_size: int | None = None  # deprecated in DeepSpeed: tensor_parallel.tp_size
    ep_size: int = 1
    moe_experts: list[int] = msgspec.field(default_factory=lambda: [1])
    moe_type: str = "standard"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def tp_size(self) -> int:
        return self.tensor_parallel.tp_size if self.tensor_parallel.enabled else 1

    @property
    def int8(self) -> bool:
        return self.torch_dtype == torch.int8 or bool(self.quant and self.quant.enabled and self.quant.weight.enabled)


def _canonical_dtype(value: Any) -> Any:
    """A torch dtype or any of DeepSpeed's names for one as its ``torch.*`` name, so that two spellings of one
    dtype compare equal; anything else as given (the Struct check names it)."""
    if isinstance(value, torch.dtype) and value not in DTYPES.values():
        raise ConfigError(f"dtype: zero's inference runs float16, bfloat16, float32 or int8, not {value}")
    dtype = value if isinstance(value, torch.dtype) else DTYPES.get(value) if isinstance(value, str) else None
    return value if dtype is None else f"torch.{str(dtype).removeprefix('torch.')}"


def load_inference_config(config: str | Path | Mapping[str, Any] | None, kwargs: Mapping[str, Any],
                          ) -> tuple[InferenceConfig, dict[str, Any]]:
    """The config from ``config`` (dict, JSON string or file) and keyword arguments (which must agree
    where both give a key, as in DeepSpeed), plus the Python objects given (``tp_group``, ``mpu``, ...)."""
    raw = dict(_read(config) if isinstance(config, str | Path) else (config or {}))
    kwargs = dict(kwargs)
    for given in (raw, kwargs):  # torch.float16 and "fp16" are one dtype
        if "dtype" in given:
            given["dtype"] = _canonical_dtype(given["dtype"])
    for key, value in kwargs.items():
        if key in raw and raw[key] != value:
            raise ConfigError(f"{key}: given as {value!r} and in the config as {raw[key]!r}; give it once")
        raw[key] = value
    for old, new in ALIASES.items():
        if old in raw:
            if new in raw:
                raise ConfigError(f"{old}: is DeepSpeed's other name for {new}; give one of them")
            raw[new] = raw.pop(old)
    objects = {key: raw.pop(key) for key in OBJECTS if key in raw}
    tp = raw.get("tensor_parallel")
    if isinstance(tp, Mapping):
        tp = dict(tp)
        objects.update({f"tp_{key}" if key == "mpu" else key: tp.pop(key) for key in ("mpu", "tp_group") if key in tp})
        raw["tensor_parallel"] = tp
    clean = _check(raw, InferenceConfig, "")
    try:
        cfg = msgspec.convert(clean, InferenceConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(str(exc), clean, InferenceConfig)) from None
    if cfg.mp_size is not None:  # DeepSpeed's old name, still read
        if "tensor_parallel" in raw and cfg.tensor_parallel.tp_size not in (1, cfg.mp_size):
            raise ConfigError(f"mp_size {cfg.mp_size} and tensor_parallel.tp_size {cfg.tensor_parallel.tp_size} "
                              "disagree; give tensor_parallel.tp_size only")
        cfg = msgspec.structs.replace(cfg, tensor_parallel=msgspec.structs.replace(cfg.tensor_parallel,
                                                                                  tp_size=cfg.mp_size))
    _check_values(cfg, objects)
    return cfg, objects


def _check_values(cfg: InferenceConfig, objects: Mapping[str, Any]) -> None:
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype: expected one of fp16, bf16, fp32, int8 (or a torch dtype), got {cfg.dtype!r}")
    if cfg.tensor_parallel.tp_size < 1:
        raise ConfigError(f"tensor_parallel.tp_size: must be >= 1, got {cfg.tensor_parallel.tp_size}")
    if cfg.max_out_tokens < 1:
        raise ConfigError(f"max_out_tokens: must be >= 1, got {cfg.max_out_tokens}")
    if cfg.quant is not None and cfg.quant.weight.num_bits != 8:
        raise ConfigError(f"quant.weight.num_bits: zero quantises weights to 8 bits, got {cfg.quant.weight.num_bits}")
    if cfg.quant is not None and cfg.quant.activation.get("enabled", False):
        raise ConfigError("quant.activation: zero quantises weights only; set quant.activation.enabled false")
    refused = {"moe": (cfg.moe not in (False, {}), "MoE inference"),
               "ep_size": (cfg.ep_size != 1, "expert-parallel inference"),
               "save_mp_checkpoint_path": (cfg.save_mp_checkpoint_path is not None, "saving a tensor-parallel "
                                           "checkpoint"),
               "injection_policy": (objects.get("injection_policy") is not None
                                    or objects.get("injection_policy_tuple") is not None,
                                    "custom injection policies (zero splits by its own plan, zero_pipe.GPT_PLAN)"),
               "training_mp_size": (cfg.training_mp_size != 1, "loading a checkpoint saved tensor-parallel"),
               "zero.stage": (cfg.zero.stage not in (0, 3), "ZeRO-Inference other than stage 3"),
               "mpu": (objects.get("mpu") is not None or objects.get("tp_mpu") is not None,
                       "a Megatron mpu (pass tensor_parallel.tp_group, a torch process group, instead)")}
    for key, (bad, what) in refused.items():
        if bad:
            raise ConfigError(f"{key}: zero's inference does not have {what}; leave it at its default")
    offload = cfg.zero.offload_param
    if offload is not None and offload.device == "nvme" and not offload.nvme_path:
        raise ConfigError("zero.offload_param.nvme_path: device 'nvme' needs an nvme_path")
    if offload is not None and offload.device != "none" and cfg.int8:
        raise ConfigError("zero.offload_param: zero streams float weights; int8 weights would stay resident in "
                          "every layer (use one of int8 or zero.offload_param)")
    if offload is not None and offload.device != "none" and cfg.zero.stage != 3:
        raise ConfigError(f"zero.offload_param: weights are streamed from {offload.device} only at zero.stage 3 "
                          f"(ZeRO-Inference), this config has stage {cfg.zero.stage}")
