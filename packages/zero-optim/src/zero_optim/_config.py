"""ZeroConfig: how a ZeRO optimizer partitions, communicates and scales (every stage, one frozen dataclass)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from ._base import DTYPES
from ._scaler import LossScaleConfig

__all__ = ["Precision", "ZeroConfig"]

Precision = Literal["fp32", "bf16", "fp16"]


@dataclass(frozen=True, kw_only=True)
class ZeroConfig:
    """How the optimizer partitions, communicates and scales.

    Args:
        stage: 0 (replicated), 1 (optimizer state partitioned), 2 (gradients too) or 3
            (parameters too: :class:`ZeroStage3`).
        precision: the dtype of model weights and gradients; master weights are fp32.
        bucket_numel: elements per communication bucket: bigger buckets mean fewer,
            more efficient collectives and, in stage 2, more memory in flight.
        align: every bucket is padded to a multiple of ``world_size * align``.
        accumulation_steps: micro-steps per optimizer step; ``backward`` divides the
            loss by it.
        clip_grad_norm: clip the global gradient norm (over all partitions) to this.
        loss_scale: fp16 dynamic loss scaling (ignored for fp32 and bf16).
        overlap_comm: stages 2-3 launch each bucket's (unit's) reduce-scatter from the
            backward hook and wait at the end of backward; off, they wait at once.
        prefetch_numel: stage 3: elements of parameters gathered ahead of use, in the
            recorded order (DeepSpeed's stage3_prefetch_bucket_size); 0 turns prefetch off.
        max_live_numel: stage 3: prefetching stops where gathered parameters would
            exceed this many elements (stage3_max_live_parameters).
        persistence_threshold: stage 3: parameters of at most this many elements stay
            whole on every rank (stage3_param_persistence_threshold).
        unit_numel: stage 3: the largest subtrees of at most this many elements whose
            head runs a forward (a transformer block) are gathered as one unit each:
            fewer, larger all-gathers and fewer hooks, at the price of that much live
            memory; a module above it gathers its own parameters as one unit. 0 gathers
            each module's own parameters alone (DeepSpeed's way). The default, 2^22
            (16 MiB of fp32), leaves a large model's layers, each bigger, as they are and
            spares small layers a collective and a hook each (a 21M GPT on 2 Gloo ranks:
            1.15x DDP's step time against 1.26x per module in one A/B run, 1.12x against
            1.10x in another: on a 2-core machine the gain is within its noise).
        granularity_threshold: stage 3: also gather as one unit, top-down, each subtree whose
            DeepSpeed granularity (its elements over its layers, ``zero_optim.granularity``) is
            at most this (DeepSpeed's stage3_module_granularity_threshold); 0 is off.
        offload_param: stage 3: keep this rank's parameter and gradient shards in the
            optimizer's store too (ZeRO-Infinity with an NVMe store: the device and host
            hold only the modules in use and the store's buffers); the store is told the
            recorded order and reads each layer's shard ahead of its gather.
        quantized_weights: stage 3, ZeRO++ qwZ: a training step's parameter all-gathers send each
            shard as int8 blocks with fp32 scales (~1/4 of fp32's bytes, ~1/2 of bf16's); the shards
            and master weights stay exact (DeepSpeed's zero_quantized_weights).
        quantized_gradients: stage 3, ZeRO++ qgZ: gradients reach their owners as int8 blocks by one
            all-to-all, summed in fp32 on arrival (zero_quantized_gradients).
        hpz_partition_size: stage 3, ZeRO++ hpZ: ranks per node group (consecutive ranks; must divide
            the world size). Above 1, every rank also keeps 1/k of each unit, refreshed by the first
            gather over the world after a step, and the step's other gathers stay inside the group
            (zero_hpz_partition_size). 1 is off.
        quantization_block: elements per int8 scale for qwZ and qgZ (a power of two >= 16): smaller
            blocks track the values more closely and send more scale bytes.
    """

    stage: int = 0
    precision: Precision = "fp32"
    bucket_numel: int = 1 << 24
    align: int = 64
    accumulation_steps: int = 1
    clip_grad_norm: float | None = None
    loss_scale: LossScaleConfig = field(default_factory=LossScaleConfig)
    overlap_comm: bool = True
    prefetch_numel: int = 50_000_000
    max_live_numel: int = 1_000_000_000
    persistence_threshold: int = 100_000
    unit_numel: int = 1 << 22
    granularity_threshold: int = 0
    offload_param: bool = False
    quantized_weights: bool = False
    quantized_gradients: bool = False
    hpz_partition_size: int = 1
    quantization_block: int = 256

    def __post_init__(self) -> None:
        for name in ("stage", "bucket_numel", "align", "accumulation_steps", "prefetch_numel", "max_live_numel",
                     "persistence_threshold", "unit_numel", "granularity_threshold"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"ZeroConfig.{name} must be an integer, got {value!r}")
        if self.stage not in (0, 1, 2, 3):
            raise ValueError(f"ZeroConfig.stage must be 0, 1, 2 or 3, got {self.stage!r}")
        if not isinstance(self.offload_param, bool):
            raise ValueError(f"ZeroConfig.offload_param must be True or False, got {self.offload_param!r}")
        if self.offload_param and self.stage != 3:
            raise ValueError(f"ZeroConfig.offload_param offloads partitioned parameters: it needs stage 3, "
                             f"got stage {self.stage} (offload the optimizer with a store instead)")
        self._check_zeropp()
        if self.precision not in DTYPES:
            raise ValueError(f"ZeroConfig.precision must be one of {', '.join(DTYPES)}, got {self.precision!r}")
        for name in ("prefetch_numel", "max_live_numel", "persistence_threshold", "unit_numel",
                     "granularity_threshold"):
            if getattr(self, name) < 0:
                raise ValueError(f"ZeroConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("bucket_numel", "align", "accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"ZeroConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        clip = self.clip_grad_norm
        if clip is not None and not (isinstance(clip, (int, float)) and math.isfinite(clip) and clip > 0):
            raise ValueError(f"ZeroConfig.clip_grad_norm must be a finite positive number, got {clip!r}")
        if isinstance(self.loss_scale, Mapping):  # the fp16 block of a config file
            object.__setattr__(self, "loss_scale", LossScaleConfig(**self.loss_scale))
        if not isinstance(self.loss_scale, LossScaleConfig):
            raise ValueError(f"ZeroConfig.loss_scale must be a LossScaleConfig or a dict of its fields, "
                             f"got {self.loss_scale!r}")

    def _check_zeropp(self) -> None:
        for name in ("quantized_weights", "quantized_gradients"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ZeroConfig.{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("hpz_partition_size", "quantization_block"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ZeroConfig.{name} must be a positive integer, got {value!r}")
        block = self.quantization_block
        if block < 16 or block & (block - 1):
            raise ValueError(f"ZeroConfig.quantization_block must be a power of two >= 16, got {block}")
        used = [n for n in ("quantized_weights", "quantized_gradients") if getattr(self, n)]
        used += ["hpz_partition_size"] if self.hpz_partition_size > 1 else []
        if used and self.stage != 3:
            raise ValueError(f"ZeroConfig.{used[0]} (ZeRO++) works on stage 3's partitioned parameters: it needs "
                             f"stage 3, got stage {self.stage}")
        if self.hpz_partition_size > 1 and self.offload_param:
            raise ValueError("ZeroConfig.hpz_partition_size > 1 keeps a secondary shard on the device, which "
                             "offload_param moves off it: use one or the other")
