"""ParameterSharder: a module's parameters partitioned over the ranks, gathered per unit on use.

The parameters are cut into :class:`GatherUnit` s by :func:`~zero_optim.unit_parameters`
(a block of up to ``unit_numel`` elements, or a larger module's own parameters). A forward
pre-hook gathers the module's units (one all-gather each), the forward hook releases them; the
first gradient to reach a module's outputs gathers them again for its backward,
and once every parameter of a unit has accumulated its gradient the unit is
released and its gradients are reduce-scattered to their owners
(:class:`~zero_optim._stage3_grads.GradientReducer`). So a rank holds 1/N of the
model plus the modules in use, and moves 3Ψ parameter-dtype elements per step: two
all-gathers and one reduce-scatter.

The order in which units are needed is recorded (forward and backward separately)
and replayed to prefetch: when a module starts, the units after it are gathered
asynchronously, up to ``prefetch_numel`` elements ahead and ``max_live_numel``
live. If a step runs in another order, the units it needs are fetched on demand
and the new order is recorded. Small parameters (``persistence_threshold``) are
kept whole in one persistent unit. A parameter used outside its own module's
forward (a tied weight read by the parent) is fetched on use and remembered, so
the next step gathers it with that module.

The sharder updates nothing: :class:`~zero_optim.ZeroStage3` steps its gradient
shards with fp32 master weights, or any torch optimizer steps
:meth:`ParameterSharder.shard_parameters` (as with FSDP2's ``fully_shard``), and
without gradients it is what inference streams the model with.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.autograd import Variable
from torch.utils._pytree import tree_flatten

from zero_comm import Communicator

from ._base import DTYPES
from ._config import ZeroConfig
from ._partition import GatherUnit, PartitionedParameter, state_dict_placeholders
from ._stage3_grads import GradientReducer, UnitGrads
from ._store import DeviceStore, StateStore
from ._trace import UseOrder
from ._units import unit_roots
from ._zeropp import apply_zeropp

__all__ = ["ParameterSharder", "TrainingState"]


class TrainingState(enum.Enum):
    """Where in a step the sharded module is."""

    IDLE = "idle"
    FORWARD = "forward"
    BACKWARD = "backward"


class ParameterSharder:
    """Partition ``module``'s parameters over ``comm``'s ranks; gather them per unit while it runs.

    Usage alone, with a torch optimizer on this rank's shards::

        sharder = ParameterSharder(model, comm)
        opt = torch.optim.AdamW(sharder.shard_parameters(), lr=1e-3)
        model(x).sum().backward()        # gradients reduce-scattered into the shards' .grad
        opt.step(); opt.zero_grad()      # the next forward gathers the new weights

    ``config`` supplies the stage-3 keys (``precision``, the dtype parameters are kept and
    gathered in; ``prefetch_numel``, ``max_live_numel``, ``persistence_threshold``,
    ``unit_numel``, ``granularity_threshold``, ``overlap_comm``, ``offload_param`` and ZeRO++'s). With
    ``train=False`` no gradient is reduced (evaluation and inference). With
    ``offload_param`` the parameter and gradient shards live in ``store``. ``owner_bytes`` is what
    an owner (the optimizer) will add to the same store for each trained unit: the store is asked
    for everything at once, before anything is written, so a disk too small names the whole need.
    """

    def __init__(self, module: nn.Module, comm: Communicator, config: ZeroConfig | None = None, *,
                 store: StateStore | None = None, hpz_comm: Communicator | None = None, train: bool = True,
                 owner_bytes: Callable[[GatherUnit], int] | None = None):
        self.config = config = config or ZeroConfig(stage=3)
        if not isinstance(module, nn.Module):
            raise TypeError(f"a sharder partitions a module's parameters: pass the model, got {type(module)}")
        if any(isinstance(p, PartitionedParameter) and p.zero.unit.on_released_use is not None
               for p in module.parameters()):
            raise ValueError("this module is already run by a ZeroStage3 optimizer or a ParameterSharder: "
                             "build one per model")
        self.module, self.comm = module, comm
        self.dtype = DTYPES[config.precision]
        self.store: StateStore = store if store is not None else DeviceStore()
        self.names = {id(p): n for n, p in module.named_parameters()}
        self.units: list[GatherUnit] = []
        self._units_of: dict[nn.Module, list[GatherUnit]] = {}
        self._build_units()
        codec = apply_zeropp(self.units, comm, config, hpz_comm)
        state_dict_placeholders(module)
        self.state = TrainingState.IDLE
        self._forward_trace, self._backward_trace = UseOrder(), UseOrder()
        self._external: dict[nn.Module, list[GatherUnit]] = {}
        self._running: list[nn.Module] = []
        # gathers launched ahead by prefetch, and gathers a module had to start and wait for itself
        self.gather_counts = {"prefetched": 0, "on_demand": 0}
        #: (unit index, gradients) of each unit with a trainable parameter; none with ``train=False``
        self.grads: list[tuple[int, UnitGrads]] = []
        if train:
            trained = [(i, u) for i, u in enumerate(self.units) if any(p.requires_grad for p in u.params)]
            extra = owner_bytes or (lambda unit: 0)
            self.store.reserve(sum(self._offloaded_bytes(u) + extra(u) for _, u in trained))  # nothing written yet
            self.grads = [(i, self._make_grads(i, u)) for i, u in trained]
        self.reducer = GradientReducer([g for _, g in self.grads], comm, self.dtype, store=self.store,
                                       codec=codec, overlap=config.overlap_comm,
                                       forward_order=lambda: self._forward_trace.order,
                                       on_first_grad=self.start_backward)
        self._shard_params: list[tuple[nn.Parameter, UnitGrads]] = []
        self._seen_versions: dict[int, int] = {}
        self._hooks: list[Any] = []
        self._install_hooks()

    # -- construction ------------------------------------------------------------------------
    def _build_units(self) -> None:
        threshold = self.config.persistence_threshold
        small: list[nn.Parameter] = []
        found = unit_roots(self.module, self.config.unit_numel, self.config.granularity_threshold)
        for named in found.parameters(self.module):
            mine = [(n, p) for n, p in named if p.numel() > threshold]
            small += [p for _, p in named if p.numel() <= threshold]
            if mine:
                self.units.append(GatherUnit([p for _, p in mine], self.comm, self.dtype,
                                             names=[n for n, _ in mine]))
        if small:
            self.units.append(GatherUnit(small, self.comm, self.dtype, names=[self.names[id(p)] for p in small],
                                         persistent=True))
        for unit in self.units:
            unit.on_released_use = self._fetch_on_use
        for module in self.module.modules():
            if id(module) in found.inside:
                continue
            units: list[GatherUnit] = []
            for p in module.parameters(recurse=id(module) in found.grouped):
                u = p.zero.unit  # type: ignore[attr-defined]
                if not u.persistent and u not in units:
                    units.append(u)
            if units:
                self._units_of[module] = units

    def _offloaded(self, unit: GatherUnit) -> bool:
        return self.config.offload_param and not unit.persistent

    def _offloaded_bytes(self, unit: GatherUnit) -> int:
        """What the store holds of ``unit`` with ``offload_param``: its parameter and gradient shards."""
        return 2 * unit.shard_numel * unit.dtype.itemsize if self._offloaded(unit) else 0

    def _make_grads(self, i: int, unit: GatherUnit) -> UnitGrads:
        trainable = sum(p.requires_grad for p in unit.params)
        if self._offloaded(unit):  # ZeRO-Infinity: the parameter and gradient shards live in the store
            grad_key = f"unit{i}.grad"
            self.store.create(grad_key, torch.zeros_like(unit.shard))
            unit.offload(self.store, f"unit{i}.param")
            return UnitGrads(unit, None, trainable, grad_key)
        return UnitGrads(unit, torch.zeros_like(unit.shard), trainable)

    def _install_hooks(self) -> None:
        root = self.module
        self._hooks.append(root.register_forward_pre_hook(self._root_pre_forward, prepend=True))
        for module in self._units_of:
            if module is not root:
                self._hooks.append(module.register_forward_pre_hook(self._pre_forward))
                self._hooks.append(module.register_forward_hook(self._post_forward, always_call=True))
        if root in self._units_of:
            self._hooks.append(root.register_forward_pre_hook(self._pre_forward))
        self._hooks.append(root.register_forward_hook(self._root_post_forward, always_call=True))
        for _, g in self.grads:
            for p in g.unit.params:
                if p.requires_grad:
                    self._hooks.append(p.register_post_accumulate_grad_hook(self.reducer.hook(g, p)))

    # -- a torch optimizer on the shards --------------------------------------------------------
    def shard_parameters(self) -> list[nn.Parameter]:
        """This rank's shard of each trainable unit, as a flat parameter sharing the shard's memory,
        for a torch optimizer (every rank steps its own). After a backward each one's ``.grad`` is
        its reduced, averaged gradient; a step's in-place update is gathered by the next forward.
        ``optimizer.zero_grad()`` (``.grad`` set to ``None``) starts the next accumulation afresh."""
        if any(g.grad is None for _, g in self.grads):
            raise ValueError("shard_parameters() needs the shards on the device: with offload_param they "
                             "live in the store; use ZeroStage3, which steps them there")
        if not self._shard_params:
            for _, g in self.grads:
                p = nn.Parameter(g.unit.shard)
                p.grad = g.grad
                self._shard_params.append((p, g))
                self._seen_versions[id(p)] = p._version
        return [p for p, _ in self._shard_params]

    def refresh(self) -> None:
        """After this rank's shards changed (an optimizer step): make the units serve the new values."""
        for unit in self.units:  # every rank, whether or not its share of the unit had anything to update
            unit.refresh()
        for p, _ in self._shard_params:
            self._seen_versions[id(p)] = p._version

    def _refresh_if_stepped(self) -> None:
        if any(p._version != self._seen_versions[id(p)] for p, _ in self._shard_params):
            self.refresh()

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
        if self.state is TrainingState.BACKWARD and torch._C._current_graph_task_id() == -1:
            self.finish_backward()  # loss.backward() ran and nothing ended it: reduce what it produced
        if self.state is TrainingState.IDLE:
            self._refresh_if_stepped()
            self.state = TrainingState.FORWARD
            self._forward_trace.start()
            self._prefetch_shards(self._forward_trace)
        if module not in self._units_of:  # a root holding no parameters runs too (it may read a tied one)
            self._running.append(module)

    def _pre_forward(self, module: nn.Module, args: Any) -> None:
        self._running.append(module)
        self._need(self._units_for(module), self._backward_trace if self.state is TrainingState.BACKWARD
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
                self.start_backward()
                self._need(self._units_for(module), self._backward_trace)

        for t in tree_flatten(output)[0]:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(hook)

    def _post_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        self._running.pop()
        self._before_backward_of(module, output)
        if self.state is not TrainingState.BACKWARD:  # a recomputation inside backward keeps them
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
        if self.state is TrainingState.FORWARD:
            for u in self.units:
                u.release()
            self._forward_trace.finish()
            self.state = TrainingState.IDLE

    def _prefetch_shards(self, trace: UseOrder) -> None:
        """Offloaded parameters: tell the store the order their shards will be gathered in."""
        if self.config.offload_param:
            self.store.prefetch([u.home[1] for u in trace.order if u.home is not None])

    # -- backward ---------------------------------------------------------------------------------
    def start_backward(self) -> None:
        """Enter the backward (an owner calls it before ``loss.backward()``; the first gradient hook
        does otherwise, and then the backward's end finishes it): start replaying the backward's
        gather order."""
        if self.state is TrainingState.BACKWARD:
            return
        self.state = TrainingState.BACKWARD
        if torch._C._current_graph_task_id() != -1:  # a plain loss.backward(): reduce all once it ends
            Variable._execution_engine.queue_callback(self.finish_backward)
        for p, g in self._shard_params:
            if p.grad is None:  # the torch optimizer's zero_grad(): accumulate afresh
                g.reduced_once = False
        self._backward_trace.start()
        self._prefetch_shards(self._backward_trace)

    def finish_backward(self) -> None:
        """End the backward: every unit's gradients reduce-scattered (zeros for any that got none)."""
        if self.state is not TrainingState.BACKWARD:
            return
        self.reducer.finish()
        for u in self.units:
            u.release()
        self._backward_trace.finish()
        self.state = TrainingState.IDLE
        for p, g in self._shard_params:
            p.grad = g.grad

    def zero_grad(self) -> None:
        """Clear the accumulated gradient shards."""
        self.reducer.clear()

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
