"""ZeroStage3: ZeRO stage 3 -- the parameters themselves are partitioned, gathered per module on use.

Each module's parameters form one :class:`GatherUnit`. A forward pre-hook gathers
the module's units (one all-gather each), the forward hook releases them; the
first gradient to reach a module's outputs gathers them again for its backward,
and once every parameter of a unit has accumulated its gradient the unit is
released and its gradients are reduce-scattered to their owners. So a rank holds
1/N of the model plus the modules in use, and moves 3Ψ parameter-dtype elements
per step: two all-gathers and one reduce-scatter.

The order in which units are needed is recorded (forward and backward separately)
and replayed to prefetch: when a module starts, the units after it are gathered
asynchronously, up to ``prefetch_numel`` elements ahead and ``max_live_numel``
live. If a step runs in another order, the units it needs are fetched on demand
and the new order is recorded. Small parameters (``persistence_threshold``) are
kept whole in one persistent unit. A parameter used outside its own module's
forward (a tied weight read by the parent) is fetched on use and remembered, so
the next step gathers it with that module.

Reduce-scatters launch in one fixed order (the reverse of each unit's first use in
the recorded forward, which is when its gradients complete), which every rank
shares, as a unit and all units before it are ready.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from zero_comm import Communicator

from ._base import Piece, Segment, ShardedOptimizer
from ._config import ZeroConfig
from ._partition import GatherUnit, PartitionedParameter, state_dict_placeholders
from ._rules import UpdateRule, check_hyperparameters
from ._stage3_grads import GradientReduction, UnitOwner
from ._store import StateStore
from ._trace import UseOrder
from ._zeropp import apply_zeropp

__all__ = ["ZeroStage3"]


class ZeroStage3(GradientReduction, ShardedOptimizer):
    """ZeRO stage 3 over ``module``: parameters, gradients and optimizer state all partitioned.

    Usage, per optimizer step::

        loss = model(batch)                      # hooks gather each module's parameters
        opt.backward(loss)                       # gradients reduce-scattered as they appear
        opt.step()

    ``module`` may have been built under :func:`zero_optim.partitioned` (it never
    existed whole) or normally (it is partitioned here, from rank 0's weights).
    ``param_groups`` is an optional list of torch-style group dicts over the
    module's parameters (``{"params": [...], "weight_decay": 0.0}``); parameters in
    none of them join the first. ``config.precision`` is the dtype the parameters
    are kept and gathered in; master weights are fp32. ZeRO++ (``config.quantized_weights``,
    ``quantized_gradients``, ``hpz_partition_size``; see ``_zeropp``) changes only what a
    step's collectives carry; ``hpz_comm`` is this rank's group of ``hpz_partition_size``
    ranks, built over the world when not given.
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
        if any(isinstance(p, PartitionedParameter) and p.zero.unit.on_released_use is not None
               for p in module.parameters()):
            raise ValueError("this module is already run by a ZeroStage3 optimizer: build one per model")
        super().__init__(rule, comm, config.precision, config.loss_scale, config.clip_grad_norm, store)
        self.stage, self.sharded = 3, True
        self.module = module
        named = dict(module.named_parameters())
        self.names = {id(p): n for n, p in named.items()}
        self._group_of = self._assign_groups(named, param_groups)
        self.units: list[GatherUnit] = []
        self._units_of: dict[nn.Module, list[GatherUnit]] = {}
        self._build_units()
        self._grad_codec = apply_zeropp(self.units, comm, config, hpz_comm)
        state_dict_placeholders(module)
        # train=False: the parameters are only partitioned and gathered (evaluation); no master weights, no state
        trained = [(i, u) for i, u in enumerate(self.units) if train and any(p.requires_grad for p in u.params)]
        self.store.reserve(sum(self._state_bytes(u) for _, u in trained))  # before anything is written
        self.owners: list[UnitOwner] = [self._make_owner(i, u) for i, u in trained]
        self._owner_of = {id(o.unit): o for o in self.owners}
        self._external: dict[nn.Module, list[GatherUnit]] = {}
        self._running: list[nn.Module] = []
        self._phase = "idle"  # "forward" | "backward"
        self._forward_trace, self._backward_trace = UseOrder(), UseOrder()
        self._reduce_order: list[UnitOwner] | None = None
        self._next_reduce = 0
        self._hooks: list[Any] = []
        # gathers launched ahead by prefetch, and gathers a module had to start and wait for itself
        self.gather_counts = {"prefetched": 0, "on_demand": 0}
        self._install_hooks()

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

    def _unit_roots(self) -> tuple[list[nn.Module], set[int], set[int]]:
        """The modules that gather their parameters as one unit: every module holding parameters, or,
        with ``unit_numel``, the largest subtrees of at most that many elements (their descendants get
        no hooks of their own: fewer, larger all-gathers)."""
        limit = self.config.unit_numel
        roots: list[nn.Module] = []
        inside: set[int] = set()  # ids of modules within a grouped subtree
        grouped: set[int] = set()  # ids of the modules that head one

        def visit(module: nn.Module) -> None:
            if limit and module is not self.module and sum(p.numel() for p in module.parameters()) <= limit:
                roots.append(module)
                grouped.add(id(module))
                inside.update(id(m) for m in module.modules() if m is not module)
                return
            roots.append(module)
            for child in module.children():
                visit(child)

        visit(self.module)
        return roots, inside, grouped

    def _build_units(self) -> None:
        threshold = self.config.persistence_threshold
        placed: set[int] = set()
        small: list[nn.Parameter] = []
        roots, inside, grouped = self._unit_roots()
        for module in roots:
            direct = list(module.named_parameters(recurse=id(module) in grouped))
            mine: list[tuple[str, nn.Parameter]] = []
            for _, p in direct:
                if id(p) in placed:
                    continue
                placed.add(id(p))
                if p.numel() <= threshold:
                    small.append(p)
                else:
                    mine.append((self.names[id(p)], p))
            if mine:
                self.units.append(GatherUnit([p for _, p in mine], self.comm, self.dtype,
                                             names=[n for n, _ in mine]))
        if small:
            self.units.append(GatherUnit(small, self.comm, self.dtype, names=[self.names[id(p)] for p in small],
                                         persistent=True))
        for unit in self.units:
            unit.on_released_use = self._fetch_on_use
            unit.on_change = [self._reload_master]
        for module in self.module.modules():
            if id(module) in inside:
                continue
            units: list[GatherUnit] = []
            for p in module.parameters(recurse=id(module) in grouped):
                u = p.zero.unit  # type: ignore[attr-defined]
                if not u.persistent and u not in units:
                    units.append(u)
            if units:
                self._units_of[module] = units

    def _state_bytes(self, unit: GatherUnit) -> int:
        """What the store will hold for ``unit``: fp32 master and rule state, and with ``offload_param``
        the parameter and gradient shards."""
        offload = self.config.offload_param and not unit.persistent
        return unit.shard_numel * (4 * (1 + len(self.rule.state_names)) + (2 * unit.dtype.itemsize if offload else 0))

    def _make_owner(self, i: int, unit: GatherUnit) -> UnitOwner:
        master = unit.shard.float()
        master_key, state_keys = f"unit{i}.master", {n: f"unit{i}.{n}" for n in self.rule.state_names}
        offload = self.config.offload_param and not unit.persistent
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
        trainable = sum(p.requires_grad for p in unit.params)
        if offload:  # ZeRO-Infinity: the parameter and gradient shards live in the store
            grad_key = f"unit{i}.grad"
            self.store.create(grad_key, torch.zeros_like(unit.shard))
            unit.offload(self.store, f"unit{i}.param")
            return UnitOwner(unit, master_key, state_keys, None, runs, trainable, grad_key)
        return UnitOwner(unit, master_key, state_keys, torch.zeros_like(unit.shard), runs, trainable)

    def _install_hooks(self) -> None:
        root = self.module
        self._hooks.append(root.register_forward_pre_hook(self._root_pre_forward, prepend=True))
        for module, _ in self._units_of.items():
            if module is not root:
                self._hooks.append(module.register_forward_pre_hook(self._pre_forward))
                self._hooks.append(module.register_forward_hook(self._post_forward, always_call=True))
        if root in self._units_of:
            self._hooks.append(root.register_forward_pre_hook(self._pre_forward))
        self._hooks.append(root.register_forward_hook(self._root_post_forward, always_call=True))
        for owner in self.owners:
            for p in owner.unit.params:
                if p.requires_grad:
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._make_grad_hook(owner, p)))

    # -- gathering ------------------------------------------------------------------------------
    def _need(self, units: Iterable[GatherUnit], trace: UseOrder) -> None:
        for u in units:
            trace.record(u)
            if not (u.gathered or u.in_flight):
                self.gather_counts["on_demand"] += 1
            u.gather(exact=False)
        self._prefetch(trace)

    def _prefetch(self, trace: UseOrder) -> None:
        if not trace.on_track or self.config.prefetch_numel <= 0:
            return
        live = sum(u.live_numel for u in self.units if not u.persistent)
        budget = self.config.prefetch_numel
        for u in trace.order[trace.cursor:]:
            if budget <= 0:
                break
            if u.gathered or u.in_flight:  # already ahead: it counts against the window
                budget -= u.padded
                continue
            if live + u.padded > self.config.max_live_numel:
                break
            u.gather(async_op=True, exact=False)
            self.gather_counts["prefetched"] += 1
            live += u.padded
            budget -= u.padded

    def _fetch_on_use(self, unit: GatherUnit, param: PartitionedParameter) -> bool:
        """A module's forward touched a parameter it does not own (a tied weight): gather it, and gather
        it with that module from now on. Outside the model's forward, refuse."""
        if not self._running:
            return False
        module = self._running[-1]
        external = self._external.setdefault(module, [])
        if unit not in external:
            external.append(unit)
        unit.gather(exact=False)
        return True

    def _units_for(self, module: nn.Module) -> list[GatherUnit]:
        return self._units_of.get(module, []) + self._external.get(module, [])

    def _root_pre_forward(self, module: nn.Module, args: Any) -> None:
        if self._phase == "backward" and torch._C._current_graph_task_id() == -1:
            self._finish_backward()  # loss.backward() ran without opt.backward: reduce what it produced
        if self._phase == "idle":
            self._phase = "forward"
            self._forward_trace.start()
            self._prefetch_shards(self._forward_trace)
        if module not in self._units_of:  # a root holding no parameters runs too (it may read a tied one)
            self._running.append(module)

    def _pre_forward(self, module: nn.Module, args: Any) -> None:
        self._running.append(module)
        self._need(self._units_for(module), self._backward_trace if self._phase == "backward"
                   else self._forward_trace)

    def _before_backward_of(self, module: nn.Module, output: Any) -> None:
        """Gather ``module``'s units when the first gradient reaches any of its outputs (a hook on each
        output that needs a gradient, the first to fire doing the work)."""
        if not torch.is_grad_enabled():
            return
        fired = [False]

        def hook(grad: torch.Tensor) -> None:
            if not fired[0]:
                fired[0] = True
                self._pre_backward(module)

        for t in tree_flatten(output)[0]:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(hook)

    def _post_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        self._running.pop()
        self._before_backward_of(module, output)
        if self._phase != "backward":  # a recomputation inside backward keeps them for the backward
            for u in self._units_for(module):
                u.release()

    def _root_post_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        # (also called when the forward raised: then nothing is left gathered or marked running)
        if module in self._units_of:
            self._post_forward(module, args, output)
        else:
            self._running.pop()
            if module in self._external:
                self._before_backward_of(module, output)
        if self._phase == "forward":
            for u in self.units:
                u.release()
            self._forward_trace.finish()
            self._phase = "idle"

    def _start_backward(self) -> None:
        self._phase = "backward"
        self._backward_trace.start()
        self._prefetch_shards(self._backward_trace)

    def _prefetch_shards(self, trace: UseOrder) -> None:
        """Offloaded parameters: tell the store the order their shards will be gathered in."""
        if self.config.offload_param:
            self.store.prefetch([u.home[1] for u in trace.order if u.home is not None])

    def _pre_backward(self, module: nn.Module) -> None:
        if self._phase != "backward":
            self._start_backward()
        self._need(self._units_for(module), self._backward_trace)

    def backward(self, loss: torch.Tensor, *, boundary: bool | None = None, scale_wrt_gas: bool = True,
                 retain_graph: bool = False) -> None:
        """Back-propagate one micro-batch's loss (scaled for fp16 and for accumulation); each unit's
        gradients are reduce-scattered once all of them are ready, overlapping the rest of backward.
        ``boundary`` (the last micro-step before a step) changes nothing: every micro-step reduces."""
        del boundary
        scale = (self.scaler.scale if self.scaler else 1.0) / (self.config.accumulation_steps if scale_wrt_gas else 1)
        self._start_backward()
        try:
            (loss * scale).backward(retain_graph=retain_graph)
        finally:
            self._finish_backward()
        self.micro_steps += 1

    # -- step -------------------------------------------------------------------------------------
    def _prepare_step(self) -> list[torch.Tensor] | Iterator[torch.Tensor]:
        self._finish_backward()  # in case loss.backward() ran without opt.backward
        if not self.config.offload_param:
            return [o.grad for o in self.owners if o.grad is not None]
        for o in self.owners:
            if o.grad_key is not None and not o.reduced_once:  # no backward since zero_grad
                self.store.put(o.grad_key, torch.zeros(o.unit.shard_numel, dtype=self.dtype))
        return self._stream_grads()

    def _stream_grads(self) -> Iterator[torch.Tensor]:
        self.store.prefetch([o.grad_key for o in self.owners if o.grad_key is not None])
        for o in self.owners:
            if o.grad is not None:
                yield o.grad
            elif o.grad_key is not None:
                yield self.store.get(o.grad_key)
                self.store.release(o.grad_key)

    def _owners(self) -> list[UnitOwner]:
        return self.owners

    def _keys(self, owner: UnitOwner) -> list[str]:  # type: ignore[override]
        extra = [owner.grad_key, owner.unit.home[1]] if owner.grad_key and owner.unit.home else []
        return [*super()._keys(owner), *extra]

    def _fetch(self, owner: UnitOwner) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # type: ignore[override]
        fetched = super()._fetch(owner)
        if owner.grad_key is not None and owner.unit.home is not None:
            owner.borrowed = {"grad": self.store.get(owner.grad_key), "shard": self.store.get(owner.unit.home[1])}
        return fetched

    def _store_back(self, owner: UnitOwner, master: torch.Tensor,  # type: ignore[override]
                    state: dict[str, torch.Tensor]) -> None:
        super()._store_back(owner, master, state)
        if owner.borrowed and owner.grad_key is not None and owner.unit.home is not None:
            self.store.put(owner.unit.home[1], owner.borrowed["shard"])  # the new weights
            self.store.release(owner.grad_key)
            owner.borrowed = {}

    def _pieces(self, owner: UnitOwner, master: torch.Tensor, state: dict[str, torch.Tensor]) -> list[Piece]:
        grad = owner.borrowed["grad"] if owner.borrowed else owner.grad
        shard = owner.borrowed["shard"] if owner.borrowed else owner.unit.shard
        if grad is None:  # offloaded and not borrowed: a view of the state only (sharded_state)
            grad = shard = master.new_empty(0)
        return [Piece(self.hparams[g], master[a:b], grad[a:b], {n: t[a:b] for n, t in state.items()},
                      shard[a:b], self._segments(owner, a, b)) for g, a, b in owner.runs]

    def _after_update(self) -> None:
        for unit in self.units:  # every rank, whether or not its share of the unit had anything to update
            unit.refresh()

    def _segments(self, owner: UnitOwner, a: int, b: int) -> list[Segment]:
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
            owner.unit.refresh()

    def zero_grad(self) -> None:
        """Clear the accumulated gradient shards (``step`` does this itself)."""
        self._drain()
        for owner in self.owners:
            if owner.grad is not None:
                owner.grad.zero_()
            owner.reduced_once = False
        self.micro_steps = 0

    # -- whole weights --------------------------------------------------------------------------
    def consolidated_state_dict(self, dtype: torch.dtype | None = None, rank0_only: bool = True
                                ) -> dict[str, torch.Tensor]:
        """The model's full ``state_dict`` (parameters and buffers), gathered one unit at a time
        (stage3_gather_16bit_weights_on_model_save). Every rank must call it; with ``rank0_only``
        the others get an empty dict."""
        keep = not rank0_only or self.comm.rank == 0
        whole: dict[int, torch.Tensor] = {}
        for unit in self.units:
            was = unit.gathered
            unit.gather()
            if keep:
                for p in unit.params:
                    with torch._C.DisableTorchFunctionSubclass():
                        whole[id(p)] = p.detach().to("cpu", dtype or p.dtype, copy=True)
            if not was:
                unit.release()
        if not keep:
            return {}
        return {name: whole[id(t)] if id(t) in whole else t.detach().to("cpu", copy=True)
                for name, t in self.module.state_dict(keep_vars=True).items()}
