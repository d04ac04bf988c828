"""ZeRO++ for stage 3: quantised weights (qwZ), quantised gradients (qgZ), hierarchical partitioning (hpZ).

What travels changes; what is kept does not: each rank's parameter shard and fp32
master stay exact, and only a training step's gathers and reduce-scatters carry
compressed or node-local data.

* qwZ -- a unit's gathers inside a training step send each shard as int8 blocks with
  one fp32 scale per ``quantization_block`` elements (:class:`Int8Blocks`, zero-kernels'
  row-wise quantisation) and every rank decodes all of them: ~1/4 of fp32's bytes,
  ~1/2 of bf16's. Exact gathers (saving weights, ``gathered``) stay exact.
* qgZ -- gradients reach their owners by :func:`zero_comm.quantized_reduce_scatter`:
  int8 chunks exchanged by one all-to-all, decoded and summed in fp32.
* hpZ -- each unit also keeps a secondary shard, partitioned over this rank's group of
  ``hpz_partition_size`` consecutive ranks (a node): the first gather after the shards
  change (an optimizer step, a load) goes over the world -- int8 under qwZ -- and keeps
  this rank's 1/k of the result; every later gather until the next change is an
  all-gather of the secondary shards inside the group. So a step's forward gathers cross
  nodes once and its backward's stay inside, as in DeepSpeed; gradients still
  reduce-scatter over the world. The group communicator books under ``hpz<k>``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

import zero_kernels as zk
from zero_comm import Communicator, Handle, RowCodec, build_partition_group, quantized_all_gather

from ._config import ZeroConfig
from ._partition import GatherUnit

__all__ = ["Int8Blocks", "TrainingGather", "apply_zeropp"]


@dataclass(frozen=True)
class Int8Blocks:
    """A :class:`zero_comm.RowCodec`: each row as int8 blocks of ``block_size`` with one fp32 scale each."""

    block_size: int = 256

    def encode(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return zk.quantize_int8_rows(rows, self.block_size)

    def decode(self, values: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> None:
        zk.dequantize_int8_rows(values, scales, self.block_size, out=out)


class TrainingGather:
    """How one unit's gathers travel inside a training step: int8 over the world (``codec``), and/or
    from a secondary shard inside this rank's partition ``group`` once the world gather refreshed it."""

    def __init__(self, unit: GatherUnit, *, codec: RowCodec | None, group: Communicator | None):
        self.codec, self.group = codec, group
        self.secondary = unit.full.new_empty(unit.padded // group.world_size) if group is not None else None
        self.fresh = False  # the secondary shard holds the current weights

    def invalidate(self) -> None:
        self.fresh = False

    def launch(self, unit: GatherUnit, shard: torch.Tensor) -> Handle:
        if self.group is not None and self.secondary is not None and self.fresh:
            return self.group.all_gather(self.secondary, out=unit.full, async_op=True)
        if self.codec is not None:
            handle = quantized_all_gather(unit.comm, shard, self.codec, out=unit.full, async_op=True)
        else:
            handle = unit.comm.all_gather(shard, out=unit.full, async_op=True)
        if self.group is None:
            return handle
        return Handle([handle], lambda: self._keep_secondary(unit), lambda: f"hpZ refresh of {unit.numel} elements")

    def _keep_secondary(self, unit: GatherUnit) -> None:
        assert self.group is not None and self.secondary is not None
        size, g = self.secondary.numel(), self.group.rank
        self.secondary.copy_(unit.full[g * size:(g + 1) * size])
        self.fresh = True


def _partition_group(comm: Communicator, size: int, given: Communicator | None) -> Communicator | None:
    """The hpZ group of ``size`` ranks (``given``, or built over the world); ``None`` where hpZ is off."""
    n = comm.world_size
    if size > 1 and n % size:
        raise ValueError(f"ZeroConfig.hpz_partition_size {size} must divide the world size {n}")
    if given is not None:
        if given.world_size != size:
            raise ValueError(f"hpz_comm has {given.world_size} ranks but ZeroConfig.hpz_partition_size is {size}")
        return given if size < n else None
    if size in (1, n):  # a group of one holds nothing; a group of the world is the primary partition
        return None
    if not dist.is_initialized() or dist.get_world_size() != n:
        raise ValueError(f"hpZ builds its groups over the whole world, but the optimizer's communicator "
                         f"'{comm.name}' has {n} ranks: pass hpz_comm, this rank's group of {size}")
    return build_partition_group(size, ledger=comm.ledger)


def apply_zeropp(units: list[GatherUnit], comm: Communicator, config: ZeroConfig,
                 hpz_comm: Communicator | None = None) -> RowCodec | None:
    """Give ``units`` their ZeRO++ gather routes; return the codec gradients reduce with (``None``: exact)."""
    group = _partition_group(comm, config.hpz_partition_size, hpz_comm)
    codec = Int8Blocks(config.quantization_block) if comm.world_size > 1 else None  # one rank sends nothing
    weights = codec if config.quantized_weights else None
    if weights is not None or group is not None:
        for unit in units:
            if not unit.persistent:  # kept whole: gathered exactly once per step, after the update
                unit.route = TrainingGather(unit, codec=weights, group=group)
    return codec if config.quantized_gradients else None
