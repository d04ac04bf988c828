"""The DeepSpeed config (``ds_config.json``) as strict, typed msgspec Structs.

A DeepSpeed user keeps their config file. Every key we honour has a typed field
here with DeepSpeed's default; a key we do not know is refused with the nearest
valid one, a value of the wrong type names the key path and what was expected, a
feature DeepSpeed has and zero does not yet says so -- nothing is silently dropped.
Integral floats are accepted where an integer is expected (configs write ``1e9``).
``"auto"`` (as Hugging Face's integration writes it) is allowed where DeepSpeed
allows it and resolved by :meth:`DeepSpeedConfig.resolve` from the world size and
the model.
"""

from __future__ import annotations

import difflib
import json
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union

import msgspec

from ._auto import TRAINER_DEFAULTS
from ._error import ConfigError

__all__ = ["ActivationCheckpointingConfig", "ConfigError", "DeepSpeedConfig", "OffloadConfig", "load_config"]

Auto = Literal["auto"]


class _Block(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class Toggle(_Block):
    """A block that only turns something on or off."""

    enabled: bool = False


class OptimizerConfig(_Block):
    type: str
    params: dict[str, Any] = msgspec.field(default_factory=dict)


class SchedulerConfig(_Block):
    type: str
    params: dict[str, Any] = msgspec.field(default_factory=dict)


class FP16Config(_Block):
    enabled: bool | Auto = False
    auto_cast: bool = False
    loss_scale: float = 0.0  # 0: dynamic
    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    consecutive_hysteresis: bool = False
    min_loss_scale: float = 1.0
    fp16_master_weights_and_grads: bool = False


class BF16Config(_Block):
    enabled: bool | Auto = False
    immediate_grad_update: bool = False


class OffloadConfig(_Block):
    device: Literal["none", "cpu", "nvme"] = "none"
    nvme_path: str | None = None
    pin_memory: bool = False
    buffer_count: int = 5
    buffer_size: int = 100_000_000
    max_in_cpu: int = 1_000_000_000
    fast_init: bool = False
    ratio: float = 1.0


class ZeroOptimizationConfig(_Block):
    stage: Literal[0, 1, 2, 3] = 0
    allgather_partitions: bool = True
    allgather_bucket_size: int | Auto = 500_000_000
    overlap_comm: bool | None = None
    reduce_scatter: bool = True
    reduce_bucket_size: int | Auto = 500_000_000
    contiguous_gradients: bool = True
    offload_param: OffloadConfig | None = None
    offload_optimizer: OffloadConfig | None = None
    sub_group_size: int = 1_000_000_000
    stage3_max_live_parameters: int | Auto = 1_000_000_000
    stage3_max_reuse_distance: int | Auto = 1_000_000_000
    stage3_prefetch_bucket_size: int | Auto = 50_000_000
    stage3_param_persistence_threshold: int | Auto = 100_000
    stage3_gather_16bit_weights_on_model_save: bool | Auto = False
    stage3_module_granularity_threshold: int = 0
    stage3_gather_fp16_weights_on_model_save: bool = False
    round_robin_gradients: bool = False
    ignore_unused_parameters: bool = True
    elastic_checkpoint: bool = False
    load_from_fp32_weights: bool = True
    memory_efficient_linear: bool = True
    cpu_offload: bool = False  # DeepSpeed's old spelling of offload_optimizer.device = "cpu"
    # ZeRO++ and MiCS: refused below unless left at their defaults
    zero_hpz_partition_size: int = 1
    zero_quantized_weights: bool = False
    zero_quantized_gradients: bool = False
    mics_shard_size: int = -1


class ActivationCheckpointingConfig(_Block):
    partition_activations: bool = False
    cpu_checkpointing: bool = False
    contiguous_memory_optimization: bool = False
    number_checkpoints: int | None = None
    synchronize_checkpoint_boundary: bool = False
    profile: bool = False


class PipelineConfig(_Block):
    stages: int | Auto = "auto"
    partition: str = "best"
    seed_layers: bool = False
    activation_checkpoint_interval: int = 0
    pipe_partitioned: bool = True
    grad_partitioned: bool = True


class CheckpointConfig(_Block):
    tag_validation: Literal["Ignore", "Warn", "Fail", "ignore", "warn", "fail"] = "Warn"
    load_universal: bool = False
    use_node_local_storage: bool = False
    parallel_write: dict[str, Any] = msgspec.field(default_factory=dict)


class MonitorConfig(_Block):
    enabled: bool = False
    output_path: str = ""
    job_name: str = "DeepSpeedJobName"


class WandbConfig(_Block):
    enabled: bool = False
    group: str | None = None
    team: str | None = None
    project: str = "deepspeed"


class AioConfig(_Block):
    block_size: int = 1_048_576
    queue_depth: int = 8
    thread_count: int = 1
    single_submit: bool = False
    overlap_events: bool = True
    use_gds: bool = False


class DeepSpeedConfig(_Block):
    """The keys of ``ds_config.json`` zero honours, with DeepSpeed's defaults."""

    train_batch_size: int | Auto | None = None
    train_micro_batch_size_per_gpu: int | Auto | None = None
    gradient_accumulation_steps: int | Auto | None = None
    steps_per_print: int = 10
    progress_bar: bool = True  # zero's own key: rank 0's bar on a terminal (ZERO_PROGRESS=0 also turns it off)
    optimizer: OptimizerConfig | None = None
    scheduler: SchedulerConfig | None = None
    fp16: FP16Config = msgspec.field(default_factory=FP16Config)
    bf16: BF16Config = msgspec.field(default_factory=BF16Config)
    gradient_clipping: float | Auto = 0.0
    prescale_gradients: bool = False
    gradient_predivide_factor: float = 1.0
    zero_allow_untested_optimizer: bool = False
    zero_force_ds_cpu_optimizer: bool = True
    zero_optimization: ZeroOptimizationConfig = msgspec.field(default_factory=ZeroOptimizationConfig)
    activation_checkpointing: ActivationCheckpointingConfig = msgspec.field(
        default_factory=ActivationCheckpointingConfig)
    pipeline: PipelineConfig = msgspec.field(default_factory=PipelineConfig)
    checkpoint: CheckpointConfig = msgspec.field(default_factory=CheckpointConfig)
    aio: AioConfig = msgspec.field(default_factory=AioConfig)
    wall_clock_breakdown: bool = False
    memory_breakdown: bool = False
    dump_state: bool = False
    tensorboard: MonitorConfig = msgspec.field(default_factory=MonitorConfig)
    csv_monitor: MonitorConfig = msgspec.field(default_factory=MonitorConfig)
    wandb: WandbConfig = msgspec.field(default_factory=WandbConfig)
    communication_data_type: Literal["fp32", "fp16", "bf16"] | None = None
    seed: int | None = None

    # -- read as DeepSpeed's plain dict (``engine.config.get("zero_optimization", {})``) --------
    def as_dict(self) -> dict[str, Any]:
        """Every key with its value (defaults included), as plain JSON types."""
        return typing.cast(dict[str, Any], msgspec.to_builtins(self))

    def get(self, key: str, default: Any = None) -> Any:
        return self.as_dict().get(key, default)

    def __getitem__(self, key: str) -> Any:
        return self.as_dict()[key]

    def __contains__(self, key: object) -> bool:
        return key in self.as_dict()

    # -- resolution ---------------------------------------------------------------------------
    def resolve(self, world_size: int, *, hidden_size: int | None = None) -> DeepSpeedConfig:
        """A copy with the batch-size triangle completed for ``world_size`` data-parallel ranks
        (``train_batch_size = micro * accumulation * world_size``) and every ``"auto"`` replaced:
        bucket sizes from ``hidden_size`` (DeepSpeed's Hugging Face rules), the rest as Hugging Face's
        Trainer would fill them with its defaults (:mod:`zero_all._config._auto`)."""
        micro, accum, total = self._triangle(world_size)
        zero = self.zero_optimization
        h = hidden_size
        sized = {
            "reduce_bucket_size": h * h if h else 500_000_000,
            "allgather_bucket_size": h * h if h else 500_000_000,
            "stage3_prefetch_bucket_size": int(0.9 * h * h) if h else 50_000_000,
            "stage3_param_persistence_threshold": 10 * h if h else 100_000,
            "stage3_max_live_parameters": 1_000_000_000,
            "stage3_max_reuse_distance": 1_000_000_000,
            "stage3_gather_16bit_weights_on_model_save": False,
        }
        zero = msgspec.structs.replace(zero, **{k: v for k, v in sized.items() if getattr(zero, k) == "auto"})
        out = msgspec.structs.replace(
            self, train_batch_size=total, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum,
            zero_optimization=zero,
            gradient_clipping=(TRAINER_DEFAULTS["gradient_clipping"] if self.gradient_clipping == "auto"
                               else self.gradient_clipping),
            fp16=msgspec.structs.replace(self.fp16, enabled=self.fp16.enabled is True),
            bf16=msgspec.structs.replace(self.bf16, enabled=self.bf16.enabled is True))
        return out

    def _triangle(self, world_size: int) -> tuple[int, int, int]:
        def given(v: int | str | None) -> int | None:
            return None if v in (None, "auto") else int(v)

        total, micro, accum = (given(self.train_batch_size), given(self.train_micro_batch_size_per_gpu),
                               given(self.gradient_accumulation_steps))
        if total is None and micro is None and self.train_micro_batch_size_per_gpu == "auto":
            micro = TRAINER_DEFAULTS["train_micro_batch_size_per_gpu"]  # what the Trainer would have written
        if total is not None and micro is not None and accum is not None:
            if total != micro * accum * world_size:
                one = " -- written for 1 rank: Accelerate on CPU ranks counts one process (docs/huggingface.md)" \
                    if total == micro * accum and world_size > 1 else ""
                raise ConfigError(
                    f"train_batch_size: {total} != train_micro_batch_size_per_gpu {micro} * "
                    f"gradient_accumulation_steps {accum} * data-parallel world size {world_size} "
                    f"(= {micro * accum * world_size}){one}")
        elif total is not None and micro is not None:
            accum, rest = divmod(total, micro * world_size)
            if rest or not accum:
                raise ConfigError(f"train_batch_size: {total} is not a multiple of train_micro_batch_size_per_gpu "
                                  f"{micro} * data-parallel world size {world_size}")
        elif total is not None:
            accum = accum or 1
            micro, rest = divmod(total, accum * world_size)
            if rest or not micro:
                raise ConfigError(f"train_batch_size: {total} is not a multiple of gradient_accumulation_steps "
                                  f"{accum} * data-parallel world size {world_size}")
        elif micro is not None:
            accum = accum or 1
            total = micro * accum * world_size
        else:
            raise ConfigError("train_batch_size: set train_batch_size or train_micro_batch_size_per_gpu (or both)")
        return micro, accum, total


# DeepSpeed features zero does not have yet: a block that turns one on is refused by name
_NOT_YET = {
    "amp": "NVIDIA Apex AMP (use bf16 or fp16)",
    "compression_training": "compression training",
    "elasticity": "elastic training",
    "autotuning": "the autotuner",
    "data_efficiency": "data efficiency (curriculum learning, data routing)",
    "curriculum_learning": "curriculum learning",
    "sparse_attention": "sparse attention",
    "flops_profiler": "the flops profiler",
    "comms_logger": "the comms logger (zero_comm's ledger counts every collective)",
    "nebula": "Nebula checkpointing",
    "quantize_training": "quantisation-aware training",
    "hybrid_engine": "the hybrid (RLHF) engine",
    "eigenvalue": "eigenvalue computation",
    "progressive_layer_drop": "progressive layer drop",
    "sparse_gradients": "sparse gradients",
    "comet": "the Comet monitor",
}
# Keys whose other values ask for something zero does not do yet: refused unless left at these values
_NOT_YET_VALUES: dict[str, tuple[tuple[Any, ...], str]] = {
    "zero_optimization.mics_shard_size": ((-1,), "MiCS sharding"),
    "zero_optimization.elastic_checkpoint": ((False,), "elastic checkpoints (its checkpoints reshard anyway)"),
    "zero_optimization.offload_param.ratio": ((1.0,), "partial parameter offload"),
    "zero_optimization.offload_optimizer.ratio": ((1.0,), "partial optimizer offload"),
    "fp16.fp16_master_weights_and_grads": ((False,), "fp16 master weights"),
    "bf16.immediate_grad_update": ((False,), "immediate bf16 gradient updates"),
    "prescale_gradients": ((False,), "gradient pre-scaling"),
    "gradient_predivide_factor": ((1.0,), "a gradient pre-divide factor"),
    "communication_data_type": ((None, "fp32"), "reduced-precision gradient communication"),
    "checkpoint.load_universal": ((False,), "universal checkpoints (its checkpoints reshard to any world size)"),
    "checkpoint.parallel_write": (({},), "pipelined parallel checkpoint writes"),
    "pipeline.seed_layers": ((False,), "per-layer seeding of pipeline stages"),
    "aio.use_gds": ((False,), "GPUDirect Storage"),
    "memory_breakdown": ((False,), "the memory breakdown printout (the step log has memory per rank)"),
    "dump_state": ((False,), "dump_state"),
    "wandb.enabled": ((False,), "the Weights & Biases monitor (use csv_monitor or tensorboard)"),
}


def _lookup(raw: Mapping[str, Any], path: str) -> tuple[bool, Any]:
    value: Any = raw
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return False, None
        value = value[part]
    return True, value


def load_config(source: str | Path | Mapping[str, Any] | DeepSpeedConfig) -> DeepSpeedConfig:
    """A :class:`DeepSpeedConfig` from a dict, a JSON string, or a ``.json``/``.yaml``/``.yml``/``.toml``
    file; raises :class:`ConfigError` naming the first key that cannot run as written."""
    if isinstance(source, DeepSpeedConfig):
        return source
    raw = _read(source) if not isinstance(source, Mapping) else dict(source)
    if not isinstance(raw, dict):
        raise ConfigError(f"a config is a mapping of keys to values, got {type(raw).__name__}")
    if raw.get("steps_per_print") == math.inf:
        raw["steps_per_print"] = 0  # Accelerate writes inf for "never"; zero's spelling of never is 0
    for key, what in _NOT_YET.items():
        block = raw.get(key)
        if block is None or block is False or (isinstance(block, Mapping) and not block.get("enabled", True)):
            raw.pop(key, None)
            continue
        raise ConfigError(f"{key}: zero does not have {what} yet; remove the block or set \"enabled\": false")
    clean = _check(raw, DeepSpeedConfig, "")
    for path, (allowed, what) in _NOT_YET_VALUES.items():
        given, value = _lookup(clean, path)
        if given and not any(value == a and isinstance(value, bool) == isinstance(a, bool) for a in allowed):
            leave = " or ".join(json.dumps(a) for a in allowed)
            raise ConfigError(f"{path}: zero does not have {what} yet (leave it at {leave})")
    try:
        config = msgspec.convert(clean, DeepSpeedConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(str(exc), clean)) from None
    _check_combinations(config)
    return config


def _read(source: str | Path) -> Any:
    text = str(source)
    if isinstance(source, str) and text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config: not valid JSON: {exc}") from None
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    data = path.read_bytes()
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            try:
                return msgspec.yaml.decode(data)
            except ImportError:
                raise ConfigError(f"{path}: reading YAML needs PyYAML (pip install 'zero-all[yaml]')") from None
        if suffix == ".toml":
            return msgspec.toml.decode(data)
        return msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{path}: cannot be parsed as {suffix.lstrip('.') or 'JSON'}: {exc}") from None


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in msgspec.structs.fields(cls)}


def _struct_of(tp: Any) -> type | None:
    """The Struct class inside ``tp`` (``Block | None`` included), if any."""
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            found = _struct_of(arg)
            if found is not None:
                return found
    return None


def _wants_int(tp: Any) -> bool:
    return tp is int or (typing.get_origin(tp) in (Union, types.UnionType) and int in typing.get_args(tp)
                         and float not in typing.get_args(tp))


def _check(raw: Mapping[str, Any], cls: type, path: str) -> dict[str, Any]:
    """Refuse unknown keys (naming the nearest known one) and turn integral floats into ints where
    an int is expected, recursively; the types themselves are msgspec's to check."""
    fields = _fields(cls)
    out: dict[str, Any] = {}
    for key, given in raw.items():
        value = given
        where = f"{path}{key}"
        if key not in fields:
            near = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            block = f" in {path.rstrip('.')}" if path else ""
            raise ConfigError(f"{where}: unknown key{block}{hint}")
        tp = fields[key]
        inner = _struct_of(tp)
        if inner is not None and isinstance(value, Mapping):
            value = _check(value, inner, where + ".")
        elif _wants_int(tp) and isinstance(value, float) and not isinstance(value, bool):
            if not (math.isfinite(value) and value.is_integer()):
                raise ConfigError(f"{where}: expected an integer, got {value!r}")
            value = int(value)
        out[key] = value
    return out


def _explain(message: str, raw: Mapping[str, Any], root: type = DeepSpeedConfig) -> str:
    """msgspec's 'Expected `int`, got `str` - at `$.zero_optimization.stage`' as
    'zero_optimization.stage: expected one of 0, 1, 2, 3, got "three"'."""
    text, _, where = message.partition(" - at `$")
    where = where.rstrip("`").lstrip(".")
    if not where:
        return text.replace("`", "")
    tp: Any = root
    value: Any = raw
    for part in where.split("."):
        cls = _struct_of(tp)
        if cls is None or part not in _fields(cls) or not isinstance(value, Mapping):
            return f"{where}: {text.replace('`', '')}"
        tp, value = _fields(cls)[part], value.get(part)
    return f"{where}: expected {_describe(tp)}, got {json.dumps(value, default=str)}"


def _describe(tp: Any) -> str:
    """What a field takes, in a config writer's words."""
    options: list[str] = []
    literals: list[Any] = []
    for arg in typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,):
        if typing.get_origin(arg) is Literal:
            literals += list(typing.get_args(arg))
        elif arg is bool:
            literals += [True, False]
        elif arg is int:
            options.append("an integer")
        elif arg is float:
            options.append("a number")
        elif arg is str:
            options.append("a string")
        elif arg is type(None):
            options.append("null")
        elif _struct_of(arg) is not None or typing.get_origin(arg) is dict:
            options.append("a mapping")
        else:
            options.append(getattr(arg, "__name__", str(arg)))
    if literals:
        options.insert(0, ("one of " if len(literals) > 1 else "") + ", ".join(map(json.dumps, literals)))
    return " or ".join(options)


def _check_combinations(config: DeepSpeedConfig) -> None:
    zero = config.zero_optimization
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        value = getattr(config, key)
        if isinstance(value, int) and value < 1:
            raise ConfigError(f"{key}: must be a positive integer (or \"auto\"), got {value}")
    if config.fp16.enabled is True and config.bf16.enabled is True:
        raise ConfigError("fp16.enabled: fp16 and bf16 cannot both be enabled")
    for name in ("offload_param", "offload_optimizer"):
        offload = getattr(zero, name)
        if offload is None or offload.device == "none":
            continue
        if offload.device == "nvme" and not offload.nvme_path:
            raise ConfigError(f"zero_optimization.{name}.nvme_path: device 'nvme' needs an nvme_path")
        if name == "offload_param" and zero.stage != 3:
            raise ConfigError(f"zero_optimization.offload_param: parameters are offloaded only in stage 3, "
                              f"this config has stage {zero.stage}")
        if name == "offload_optimizer" and zero.stage == 0:
            raise ConfigError("zero_optimization.offload_optimizer: needs stage 1, 2 or 3 (stage is 0)")
    param, opt = zero.offload_param, zero.offload_optimizer
    if (param is not None and param.device == "cpu" and not zero.cpu_offload
            and (opt is None or opt.device == "none")):
        raise ConfigError("zero_optimization.offload_param.device 'cpu' needs offload_optimizer.device 'cpu' too: "
                          "zero keeps offloaded parameter shards in the optimizer's store")
    if config.gradient_clipping != "auto" and config.gradient_clipping < 0:
        raise ConfigError(f"gradient_clipping: must be >= 0 (0 turns it off), got {config.gradient_clipping}")
