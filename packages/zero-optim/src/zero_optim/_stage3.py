"""ZeroStage3: ZeRO stage 3 -- the optimizer of a :class:`~zero_optim.ParameterSharder`'s shards.

The sharder partitions the module's parameters into gather units, gathers them per
module on use and reduce-scatters their gradients into this rank's gradient shards
(see ``_sharder``). This optimizer keeps each unit's fp32 master weights and rule
state (in its store), folds loss scaling, clipping and overflow into one step over
the gradient shards, writes the new weights into the unit shards and tells the
sharder they changed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from zero_comm import Communicator

from ._base import Piece, Segment, ShardedOptimizer
from ._config import ZeroConfig
from ._partition import GatherUnit
from ._rules import UpdateRule, check_hyperparameters
from ._sharder import ParameterSharder
from ._stage3_grads import UnitGrads
from ._store import StateStore

__all__ = ["ZeroStage3"]


@dataclass
class UnitState:
    """The optimizer's part of one unit: fp32 master of its flat shard and the rule's state (store
    keys), and the runs of trainable parameters in the shard, by parameter group."""

    grads: UnitGrads
    master_key: str
    state_keys: dict[str, str]
    runs: list[tuple[int, int, int]]  # (group index, start, stop) in the shard
    borrowed: dict[str, torch.Tensor] = field(default_factory=dict)  # offloaded shards during a step

    @property
    def unit(self) -> GatherUnit:
        return self.grads.unit

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [tuple(p.shape) for p in self.unit.params]


class ZeroStage3(ShardedOptimizer):
    """ZeRO stage 3 over ``module``: parameters, gradients and optimizer state all partitioned.

    Usage, per optimizer step::

        loss = model(batch)                      # hooks gather each module's parameters
        opt.backward(loss)                       # gradients reduce-scattered as they appear
        opt.step()

    ``module`` may have been built under :func:`zero_optim.partitioned` (it never
    existed whole) or normally (it is partitioned here, from rank 0's weights), by a
    :class:`ParameterSharder` this optimizer builds (``opt.sharder``).
    ``param_groups`` is an optional list of torch-style group dicts over the
    module's parameters (``{"params": [...], "weight_decay": 0.0}``); parameters in
    none of them join the first. ``config.precision`` is the dtype the parameters
    are kept and gathered in; master weights are fp32. ZeRO++ (``config.quantized_weights``,
    ``quantized_gradients``, ``hpz_partition_size``; see ``_zeropp``) changes only what a
    step's collectives carry; ``hpz_comm`` is this rank's group of ``hpz_partition_size``
    ranks, built over the world when not given. ``train=False``: the parameters are only
    partitioned and gathered (evaluation); no master weights, no state.
    """

    def __init__(self, module: nn.Module, rule: UpdateRule, *, comm: Communicator,
                 config: ZeroConfig | None = None, store: StateStore | None = None,
                 param_groups: Iterable[Mapping[str, Any]] | None = None, train: bool = True,
                 hpz_comm: Communicator | None = None):
        self.config = config = config or ZeroConfig(stage=3)
        if config.stage != 3:
            raise ValueError(f"ZeroStage3 needs ZeroConfig(stage=3, ...), got stage {config.stage}")
        if not isinstance(module, nn.Module):
            raise TypeError(f"ZeroStage3 partitions a module's parameters: pass the model, got {type(module)}")
        super().__init__(rule, comm, config.precision, config.loss_scale, config.clip_grad_norm, store)
        self.stage, self.sharded = 3, True
        self.module = module
        named = dict(module.named_parameters())
        self.names = {id(p): n for n, p in named.items()}
        self._group_of = self._assign_groups(named, param_groups)
        self.sharder = ParameterSharder(module, comm, config, store=self.store, hpz_comm=hpz_comm, train=train,
                                        owner_bytes=self._state_bytes)  # reserved with the sharder's own
        for unit in self.sharder.units:
            unit.on_change.append(self._reload_master)
        self.owners: list[UnitState] = [self._make_owner(i, g) for i, g in self.sharder.grads]
        self._owner_of = {id(o.unit): o for o in self.owners}

    @property
    def units(self) -> list[GatherUnit]:
        """The sharder's gather units, in the order they were built."""
        return self.sharder.units

    @property
    def gather_counts(self) -> dict[str, int]:
        """Gathers launched ahead by prefetch, and gathers a module had to start and wait for itself."""
        return self.sharder.gather_counts

    # -- construction ------------------------------------------------------------------------
    def _assign_groups(self, named: dict[str, nn.Parameter],
                       groups: Iterable[Mapping[str, Any]] | None) -> dict[int, int]:
        ids = {id(p) for p in named.values()}
        group_of: dict[int, int] = {}
        for i, group in enumerate(groups or [{"params": []}]):
            if "params" not in group:
                raise ValueError(f"parameter group {i} has no 'params' entry (keys: {sorted(group)})")
            check_hyperparameters(self.rule, group, f"parameter group {i}")
            params: list[nn.Parameter] = []
            self.hparams.append({"params": params, **self.rule.defaults,
                                 **{k: v for k, v in group.items() if k != "params"}})
            for p in group["params"]:
                if id(p) not in ids:
                    raise ValueError(f"parameter group {i} holds a parameter of shape {tuple(p.shape)} that is "
                                     "not in the module")
                if id(p) in group_of:
                    raise ValueError(f"parameter {self.names[id(p)]!r} appears in more than one group")
                group_of[id(p)] = i
                if p.requires_grad:
                    params.append(p)
        self.hparams[0]["params"] += [p for p in named.values() if p.requires_grad and id(p) not in group_of]
        if not any(p.requires_grad for p in named.values()):
            raise ValueError("ZeroStage3 got a module with no parameters that require grad")
        return group_of

    def _state_bytes(self, unit: GatherUnit) -> int:
        """What the store will hold for ``unit``: fp32 master and rule state."""
        return unit.shard_numel * 4 * (1 + len(self.rule.state_names))

    def _make_owner(self, i: int, grads: UnitGrads) -> UnitState:
        unit = grads.unit
        with unit.local_shard() as shard:
            master = shard.float()
        master_key, state_keys = f"unit{i}.master", {n: f"unit{i}.{n}" for n in self.rule.state_names}
        self.store.create(master_key, master)
        for key in state_keys.values():
            self.store.create(key, torch.zeros_like(master))
        runs: list[tuple[int, int, int]] = []
        for p in unit.params:
            z = p.zero  # type: ignore[attr-defined]
            if not p.requires_grad or z.stop == z.start:
                continue
            g, end = self._group_of.get(id(p), 0), z.at + z.stop - z.start
            if runs and runs[-1][0] == g and runs[-1][2] == z.at:
                runs[-1] = (g, runs[-1][1], end)
            else:
                runs.append((g, z.at, end))
        return UnitState(grads, master_key, state_keys, runs)

    # -- backward -------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, *, boundary: bool | None = None, scale_wrt_gas: bool = True,
                 retain_graph: bool = False) -> None:
        """Back-propagate one micro-batch's loss (scaled for fp16 and for accumulation); each unit's
        gradients are reduce-scattered once all of them are ready, overlapping the rest of backward.
        ``boundary`` (the last micro-step before a step) changes nothing: every micro-step reduces."""
        del boundary
        scale = self._loss_multiplier(scale_wrt_gas)
        self.sharder.start_backward()
        try:
            (loss * scale).backward(retain_graph=retain_graph)
        finally:
            self.sharder.finish_backward()
        self.micro_steps += 1

    # -- step -------------------------------------------------------------------------------------
    def _prepare_step(self) -> list[torch.Tensor] | Iterator[torch.Tensor]:
        self.sharder.finish_backward()  # in case loss.backward() ran without opt.backward
        if not self.config.offload_param:
            return [o.grads.grad for o in self.owners if o.grads.grad is not None]
        for o in self.owners:
            g = o.grads
            if g.grad_key is not None and not g.reduced_once:  # no backward since zero_grad
                self.store.put(g.grad_key, torch.zeros(o.unit.shard_numel, dtype=self.dtype))
        return self._stream_grads()

    def _stream_grads(self) -> Iterator[torch.Tensor]:
        self.store.prefetch([o.grads.grad_key for o in self.owners if o.grads.grad_key is not None])
        for o in self.owners:
            if o.grads.grad is not None:
                yield o.grads.grad
            elif o.grads.grad_key is not None:
                yield self.store.get(o.grads.grad_key)
                self.store.release(o.grads.grad_key)

    def _owners(self) -> list[UnitState]:
        return self.owners

    def _keys(self, owner: UnitState) -> list[str]:  # type: ignore[override]
        grad_key, home = owner.grads.grad_key, owner.unit.home
        return [*super()._keys(owner), *([grad_key, home[1]] if grad_key and home else [])]

    def _fetch(self, owner: UnitState) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # type: ignore[override]
        fetched = super()._fetch(owner)
        grad_key, home = owner.grads.grad_key, owner.unit.home
        if grad_key is not None and home is not None:
            owner.borrowed = {"grad": self.store.get(grad_key), "shard": self.store.get(home[1])}
        return fetched

    def _store_back(self, owner: UnitState, master: torch.Tensor,  # type: ignore[override]
                    state: dict[str, torch.Tensor]) -> None:
        super()._store_back(owner, master, state)
        grad_key, home = owner.grads.grad_key, owner.unit.home
        if owner.borrowed and grad_key is not None and home is not None:
            self.store.put(home[1], owner.borrowed["shard"])  # the new weights
            self.store.release(grad_key)
            owner.borrowed = {}

    def _pieces(self, owner: UnitState, master: torch.Tensor, state: dict[str, torch.Tensor]) -> list[Piece]:
        grad = owner.borrowed["grad"] if owner.borrowed else owner.grads.grad
        shard = owner.borrowed["shard"] if owner.borrowed else owner.unit.shard
        if grad is None:  # offloaded and not borrowed: a view of the state only (sharded_state)
            grad = shard = master.new_empty(0)
        return [Piece(self.hparams[g], master[a:b], grad[a:b], {n: t[a:b] for n, t in state.items()},
                      shard[a:b], self._segments(owner, a, b)) for g, a, b in owner.runs]

    def _after_update(self) -> None:
        self.sharder.refresh()

    def _segments(self, owner: UnitState, a: int, b: int) -> list[Segment]:
        out = []
        for p in owner.unit.params:
            z = p.zero  # type: ignore[attr-defined]
            if p.requires_grad and a <= z.at < b and z.stop > z.start:
                out.append((p, z.start, z.at - a, z.stop - z.start))
        return out

    def _parameters(self) -> list[nn.Parameter]:
        return [p for o in self.owners for p in o.unit.params if p.requires_grad]

    def _names(self) -> dict[int, str]:
        return self.names

    def _reload_master(self, unit: GatherUnit) -> None:
        """After ``gathered(..., modifier_rank=...)``: the master weights take the unit's new values. In
        bf16/fp16 an element the block left as it was keeps its fp32 master (the unit may hold other
        parameters than the ones changed, and its weights are the masters rounded)."""
        owner = self._owner_of.get(id(unit))
        if owner is None:
            return
        with unit.local_shard() as shard:
            new = shard.float()
            if shard.dtype != torch.float32:
                old = self.store.get(owner.master_key)
                kept = old.to(shard.dtype) == shard.to(old.device)
                new = torch.where(kept, old, new.to(old.device))
                self.store.release(owner.master_key)
            self.store.put(owner.master_key, new)

    def _after_load(self) -> None:
        for owner in self.owners:
            with owner.unit.local_shard(write=True) as shard:
                shard.copy_(self.store.get(owner.master_key))
            self.store.release(owner.master_key)
        self.sharder.refresh()

    def zero_grad(self) -> None:
        """Clear the accumulated gradient shards (``step`` does this itself)."""
        self.sharder.zero_grad()
        self.micro_steps = 0

    def consolidated_state_dict(self, dtype: torch.dtype | None = None, rank0_only: bool = True
                                ) -> dict[str, torch.Tensor]:
        """The model's full ``state_dict`` (parameters and buffers), gathered one unit at a time
        (stage3_gather_16bit_weights_on_model_save). Every rank must call it; with ``rank0_only``
        the others get an empty dict."""
        return self.sharder.consolidated_state_dict(dtype, rank0_only)
