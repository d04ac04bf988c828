"""The config reference (docs/config-reference.md), generated from the Structs of ``_config``.

Every key's type and default come from the Struct that parses it, so the page cannot
drift from the parser; the one-line meaning of each key is written here, and
:func:`config_reference` refuses to render while a key lacks one. Regenerate with
``python -m zero_all._config._doc > docs/config-reference.md``; an integration test
checks the page is current.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import msgspec

from ._schema import _NOT_YET, _NOT_YET_VALUES, DeepSpeedConfig, _describe, _fields, _struct_of

__all__ = ["config_reference"]

_IGNORED = "accepted for compatibility; no effect in zero"

MEANING: dict[str, str] = {
    "train_batch_size": "Samples per optimizer step over all data-parallel ranks; with the next two it forms the "
                        "batch triangle, completed or checked at `initialize`.",
    "train_micro_batch_size_per_gpu": "Samples per rank per forward/backward.",
    "gradient_accumulation_steps": "Micro-batches per optimizer step.",
    "steps_per_print": "Rank 0 logs a progress line every this many optimizer steps (INFO on the `zero_all` "
                       "logger: shown where the application's logging shows it; `zero run` shows it on stderr).",
    "progress_bar": "zero's own key: rank 0 redraws a one-line progress bar on stderr when stderr is a terminal "
                    "(never in logs or CI); false, or `ZERO_PROGRESS=0` in the environment, turns it off.",
    "optimizer": "The update rule; leave it out to pass a client optimizer to `initialize`.",
    "optimizer.type": "Adam, AdamW, Lamb, Lion or SGD (case-insensitive), or any other `torch.optim` class by "
                      "name. Adam decouples weight decay unless `params.adam_w_mode` is false, as in DeepSpeed.",
    "optimizer.params": "The hyper-parameters, with DeepSpeed's names and its optimizer classes' defaults (no weight "
                        "decay unless given); an unknown one is refused naming the nearest, \"auto\" is refused.",
    "scheduler": "The learning-rate schedule, stepped after each optimizer step that was not skipped.",
    "scheduler.type": "WarmupLR, WarmupDecayLR, WarmupCosineLR, OneCycle or LRRangeTest.",
    "scheduler.params": "The schedule's parameters, with DeepSpeed's names and defaults; \"auto\" is refused.",
    "fp16": "fp16 mixed precision with dynamic loss scaling (fp32 master weights).",
    "fp16.enabled": "Train in fp16.",
    "fp16.auto_cast": "With fp16 on, the floating-point tensors given to the engine's forward are cast to fp16.",
    "fp16.loss_scale": "0 for dynamic loss scaling, otherwise a static scale.",
    "fp16.initial_scale_power": "The dynamic scale starts at 2**this.",
    "fp16.loss_scale_window": "Steps without overflow before the scale doubles.",
    "fp16.hysteresis": "Overflows tolerated before the scale halves.",
    "fp16.consecutive_hysteresis": "Refill the hysteresis after each step without overflow.",
    "fp16.min_loss_scale": "The scale never drops below this.",
    "fp16.fp16_master_weights_and_grads": "Refused unless false (master weights are always fp32).",
    "bf16": "bf16 mixed precision (fp32 master weights, no loss scaling).",
    "bf16.enabled": "Train in bf16.",
    "bf16.immediate_grad_update": "Refused unless false.",
    "gradient_clipping": "Clip the global gradient norm to this (0: off).",
    "prescale_gradients": "Refused unless false.",
    "gradient_predivide_factor": "Refused unless 1.0.",
    "zero_allow_untested_optimizer": _IGNORED + " (every rule zero has is tested with every stage).",
    "zero_force_ds_cpu_optimizer": _IGNORED + " (an offloaded optimizer always runs zero's CPU Adam).",
    "zero_optimization": "ZeRO: what is partitioned across data-parallel ranks, and where it lives.",
    "zero_optimization.stage": "0: plain data parallelism; 1: optimizer state partitioned; 2: and gradients; "
                               "3: and the parameters themselves.",
    "zero_optimization.allgather_partitions": _IGNORED + " (updated shards are always all-gathered).",
    "zero_optimization.allgather_bucket_size": _IGNORED + " (stage 1-2 gathers one flat group at a time).",
    "zero_optimization.overlap_comm": "Reduce gradient buckets while backward goes on (default: on).",
    "zero_optimization.reduce_scatter": _IGNORED + " (stages 2-3 always reduce-scatter).",
    "zero_optimization.reduce_bucket_size": "Elements per gradient-reduction bucket.",
    "zero_optimization.contiguous_gradients": _IGNORED + " (gradients are always reduced from flat buckets).",
    "zero_optimization.offload_param": "Stage 3: where the partitioned parameters (with their fp32 masters) live.",
    "zero_optimization.offload_param.device": "none, cpu (pinned host memory when available) or nvme.",
    "zero_optimization.offload_param.nvme_path": "The directory for NVMe swap files.",
    "zero_optimization.offload_param.pin_memory": "Pin the host buffers.",
    "zero_optimization.offload_param.buffer_count": _IGNORED + " (the NVMe store sizes its own buffer pool).",
    "zero_optimization.offload_param.buffer_size": _IGNORED + " (see buffer_count).",
    "zero_optimization.offload_param.max_in_cpu": _IGNORED + ".",
    "zero_optimization.offload_param.fast_init": _IGNORED + ".",
    "zero_optimization.offload_param.ratio": "Refused unless 1.0.",
    "zero_optimization.offload_optimizer": "Where fp32 master weights and optimizer state live; the step then "
                                           "runs there (CPU Adam for Adam/AdamW).",
    "zero_optimization.offload_optimizer.device": "none, cpu or nvme.",
    "zero_optimization.offload_optimizer.nvme_path": "The directory for NVMe swap files.",
    "zero_optimization.offload_optimizer.pin_memory": "Pin the host buffers.",
    "zero_optimization.offload_optimizer.buffer_count": _IGNORED + " (the NVMe store sizes its own buffer pool).",
    "zero_optimization.offload_optimizer.buffer_size": _IGNORED + " (see buffer_count).",
    "zero_optimization.offload_optimizer.max_in_cpu": _IGNORED + ".",
    "zero_optimization.offload_optimizer.fast_init": _IGNORED + ".",
    "zero_optimization.offload_optimizer.ratio": "Refused unless 1.0.",
    "zero_optimization.sub_group_size": _IGNORED + " (the optimizer steps one flat shard per parameter group).",
    "zero_optimization.stage3_max_live_parameters": "Stage 3: the most gathered parameter elements alive at once.",
    "zero_optimization.stage3_max_reuse_distance": _IGNORED + " (a module's parameters are released after use).",
    "zero_optimization.stage3_prefetch_bucket_size": "Stage 3: elements gathered ahead of use.",
    "zero_optimization.stage3_param_persistence_threshold": "Stage 3: parameters this small stay whole on every "
                                                            "rank.",
    "zero_optimization.stage3_module_granularity_threshold": "Stage 3: a module whose parameters per layer are at "
    "most this is gathered whole, with its subtree, as DeepSpeed fuses it (0: off; zero's own default already "
    "gathers subtrees of up to 2^22 elements whole).",
    "zero_optimization.stage3_gather_16bit_weights_on_model_save": "Stage 3: `save_16bit_model` gathers whole "
                                                                   "weights.",
    "zero_optimization.stage3_gather_fp16_weights_on_model_save": "Refused unless false (the old spelling of the "
                                                                  "key above).",
    "zero_optimization.round_robin_gradients": _IGNORED + ".",
    "zero_optimization.ignore_unused_parameters": _IGNORED + " (a parameter without a gradient contributes zero).",
    "zero_optimization.elastic_checkpoint": "Refused unless false (checkpoints reshard to any world size anyway).",
    "zero_optimization.load_from_fp32_weights": _IGNORED + " (checkpoints always hold the fp32 masters).",
    "zero_optimization.memory_efficient_linear": _IGNORED + ".",
    "zero_optimization.cpu_offload": "DeepSpeed's old spelling of `offload_optimizer.device: cpu`.",
    "zero_optimization.zero_hpz_partition_size": "ZeRO++ hpZ (stage 3): ranks per node group; each keeps a second "
                                                "parameter shard over its group, and a step's gathers stay inside "
                                                "it. 1: off.",
    "zero_optimization.zero_quantized_weights": "ZeRO++ qwZ (stage 3): parameter gathers carry int8 blocks with "
                                                "their scales; master weights stay fp32.",
    "zero_optimization.zero_quantized_gradients": "ZeRO++ qgZ (stage 3): gradients are reduce-scattered as int8 "
                                                  "blocks by one all-to-all, summed in fp32.",
    "zero_optimization.mics_shard_size": "MiCS; refused unless -1.",
    "activation_checkpointing": "How `checkpointing.checkpoint` saves activations.",
    "activation_checkpointing.partition_activations": "Split saved activations across model-parallel ranks.",
    "activation_checkpointing.cpu_checkpointing": "Keep saved activations in host memory.",
    "activation_checkpointing.contiguous_memory_optimization": "Copy saved activations into one buffer.",
    "activation_checkpointing.number_checkpoints": "How many checkpoints the buffer above holds.",
    "activation_checkpointing.synchronize_checkpoint_boundary": "Synchronize the device at each checkpoint.",
    "activation_checkpointing.profile": "Time the checkpointed forward and recompute.",
    "pipeline": "Pipeline parallelism, for a model given as a `pipe.PipelineModule`.",
    "pipeline.stages": "Pipeline stages (\"auto\": from the PipelineModule).",
    "pipeline.partition": "How layers are split: parameters, uniform or type:<regex>.",
    "pipeline.seed_layers": "Refused unless false.",
    "pipeline.activation_checkpoint_interval": "Checkpoint every this many layers (0: off).",
    "pipeline.pipe_partitioned": _IGNORED + ".",
    "pipeline.grad_partitioned": _IGNORED + ".",
    "checkpoint": "How checkpoints are written and read.",
    "checkpoint.tag_validation": "Whether all ranks' checkpoint tags are compared (Ignore, Warn or Fail).",
    "checkpoint.load_universal": "Refused unless false (zero's checkpoints reshard to any world size).",
    "checkpoint.use_node_local_storage": "Accepted on one node, where it changes nothing; refused across nodes (zero "
                                         "writes checkpoints to storage every rank shares).",
    "checkpoint.parallel_write": "Refused unless empty.",
    "aio": "The NVMe store's I/O.",
    "aio.block_size": "Bytes per I/O request; the store's buffer is 64 of these (at least 1 GiB).",
    "aio.queue_depth": _IGNORED + " (the store issues blocking O_DIRECT requests from its I/O threads).",
    "aio.thread_count": _IGNORED + " (one I/O thread measured fastest; see docs/zero-offload.md).",
    "aio.single_submit": _IGNORED + ".",
    "aio.overlap_events": _IGNORED + ".",
    "aio.use_gds": "Refused unless false.",
    "wall_clock_breakdown": "Add forward, backward and step times to the progress line.",
    "memory_breakdown": "Refused unless false (the progress line has memory per rank).",
    "dump_state": "Refused unless false.",
    "tensorboard": "Write training events for TensorBoard (needs the tensorboard package).",
    "tensorboard.enabled": "Turn the monitor on.",
    "tensorboard.output_path": "The directory for event files.",
    "tensorboard.job_name": "A subdirectory per job.",
    "csv_monitor": "Write training events as CSV files, one per event.",
    "csv_monitor.enabled": "Turn the monitor on.",
    "csv_monitor.output_path": "The directory for CSV files.",
    "csv_monitor.job_name": "A subdirectory per job.",
    "wandb": "Weights & Biases.",
    "wandb.enabled": "Refused unless false.",
    "wandb.group": _IGNORED + ".",
    "wandb.team": _IGNORED + ".",
    "wandb.project": _IGNORED + ".",
    "communication_data_type": "Refused unless null or fp32 (gradients are reduced in fp32).",
    "seed": _IGNORED + " (seed torch yourself before building the model, as the examples do).",
}


def _keys(cls: type = DeepSpeedConfig, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    defaults = {f.name: f for f in msgspec.structs.fields(cls)}
    for name, tp in _fields(cls).items():
        field = defaults[name]
        default = field.default if field.default is not msgspec.NODEFAULT else (
            field.default_factory() if field.default_factory is not msgspec.NODEFAULT else _REQUIRED)
        yield prefix + name, tp, default
        inner = _struct_of(tp)
        if inner is not None:
            yield from _keys(inner, prefix + name + ".")


_REQUIRED = object()


def _show(default: Any) -> str:
    if default is _REQUIRED:
        return "required"
    if isinstance(default, msgspec.Struct):
        return ""
    return f"`{json.dumps(default)}`"


def config_reference() -> str:
    """The markdown page: every key with its type, default and meaning, then what is refused."""
    rows = list(_keys())
    missing = [path for path, _, _ in rows if path not in MEANING]
    stale = sorted(set(MEANING) - {path for path, _, _ in rows})
    if missing or stale:
        raise RuntimeError(f"config reference out of date: undocumented {missing}, no longer keys {stale}")
    lines = [
        "# Config reference",
        "",
        "<!-- generated by `python -m zero_all._config._doc > docs/config-reference.md`; do not edit -->",
        "",
        "zero reads DeepSpeed's `ds_config.json` (or YAML, TOML, a dict). These are the keys it knows, with",
        "DeepSpeed's defaults. A key not listed is refused with the nearest valid one; a value of the wrong",
        "type is refused naming the key and what it takes. `\"auto\"` is resolved at `initialize` from the",
        "world size and the model, as DeepSpeed's Hugging Face integration does.",
        "",
        "| key | takes | default | meaning |",
        "|---|---|---|---|",
    ]
    for path, tp, default in rows:
        takes = "a mapping" if _struct_of(tp) is not None and type(None) not in getattr(tp, "__args__", ()) \
            else _describe(tp)
        lines.append(f"| `{path}` | {takes.replace('|', '/')} | {_show(default)} | {MEANING[path]} |")
    lines += ["", "## Refused", "", "These blocks name DeepSpeed features zero does not have yet; a config that "
              "turns one on is refused by name:", ""]
    lines += [f"- `{key}`: {what}" for key, what in sorted(_NOT_YET.items())]
    lines += ["", "These keys are refused unless left at the values shown:", ""]
    lines += [f"- `{path}`: {what} (allowed: {', '.join(json.dumps(a) for a in allowed)})"
              for path, (allowed, what) in sorted(_NOT_YET_VALUES.items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(config_reference(), end="")
