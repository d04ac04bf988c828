"""Stage 3's gradients: staged per unit as they arrive, reduce-scattered to their owners, accumulated.

Each trainable unit has a :class:`UnitOwner`: its fp32 master and rule state (by
store key) and this rank's gradient shard. A parameter's post-accumulate hook copies
its gradient into the unit's full-size staging buffer; once every trainable
parameter of the unit has arrived the unit is released and, in one order every rank
shares (the reverse of each unit's first use in the recorded forward), its staging
buffer is reduce-scattered to the owners -- plainly, or with ``quantized_gradients``
as int8 blocks exchanged by one all-to-all (ZeRO++'s qgZ) -- and accumulated into
the gradient shard, on the device or in the store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from zero_comm import Handle, quantized_reduce_scatter

from ._partition import GatherUnit, _release

if TYPE_CHECKING:
    from zero_comm import Communicator, RowCodec

    from ._config import ZeroConfig
    from ._store import StateStore
    from ._trace import UseOrder

__all__ = ["GradientReduction", "UnitOwner"]


@dataclass
class UnitOwner:
    """A unit's optimizer state: fp32 master of its flat shard, the rule's state, its gradient shard."""

    unit: GatherUnit
    master_key: str
    state_keys: dict[str, str]
    grad: torch.Tensor | None  # the reduced gradient of this rank's shard, accumulated over micro-steps
    runs: list[tuple[int, int, int]]  # (group index, start, stop) in the shard: runs of trainable params
    trainable: int  # parameters that get a gradient
    grad_key: str | None = None  # offload_param: the gradient shard lives in the store instead
    arrived: int = 0
    staging: torch.Tensor | None = None  # full-size gradients of this micro-step, rank-major
    reduced_once: bool = False
    borrowed: dict[str, torch.Tensor] = field(default_factory=dict)  # offloaded shards during a step

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [tuple(p.shape) for p in self.unit.params]


class GradientReduction:
    """The gradient half of :class:`~zero_optim.ZeroStage3` (a mixin: it shares the optimizer's state)."""

    if TYPE_CHECKING:
        comm: Communicator
        config: ZeroConfig
        dtype: torch.dtype
        store: StateStore
        units: list[GatherUnit]
        owners: list[UnitOwner]
        _owner_of: dict[int, UnitOwner]
        _pending: list[tuple[Handle, Callable[[], object] | None]]
        _phase: str
        _forward_trace: UseOrder
        _backward_trace: UseOrder
        _reduce_order: list[UnitOwner] | None
        _next_reduce: int
        _grad_codec: RowCodec | None

        def _start_backward(self) -> None: ...
        def _drain(self, keep: int = 0) -> None: ...

    def _make_grad_hook(self, owner: UnitOwner, p: nn.Parameter):
        unit = owner.unit
        i = next(k for k, q in enumerate(unit.params) if q is p)
        off, numel = unit.offsets[i], p.numel()

        def hook(param: torch.Tensor) -> None:
            grad = param.grad
            param.grad = None  # the gradient shards own gradients from here on
            if grad is None:
                return
            if self._phase != "backward":
                self._start_backward()
            if owner.staging is None:
                owner.staging = torch.zeros(unit.padded, dtype=self.dtype, device=grad.device)
            owner.staging[off:off + numel].view(param.shape).copy_(grad)
            owner.arrived += 1
            if owner.arrived == owner.trainable:
                unit.release()
                self._launch_ready(flush=False)

        return hook

    def _launch_ready(self, flush: bool) -> None:
        """Reduce-scatter complete units in the shared order; with ``flush`` the rest too (a gradient
        that never came counts as zero)."""
        if self._reduce_order is None:
            # a unit's gradients are complete once the backward of its *first* use in forward has run
            # (a tied embedding, read again by the head, completes last): reduce in reverse first use
            order = []
            for u in reversed(list(dict.fromkeys(self._forward_trace.order))):
                owner = self._owner_of.get(id(u))
                if owner is not None:
                    order.append(owner)
            self._reduce_order = order + [o for o in self.owners if o not in order]
        while self._next_reduce < len(self._reduce_order):
            owner = self._reduce_order[self._next_reduce]
            if not flush and owner.arrived < owner.trainable:
                return
            self._reduce(owner)
            self._next_reduce += 1

    def _reduce(self, owner: UnitOwner) -> None:
        staging = owner.staging
        if staging is None:  # no parameter of this unit got a gradient in this micro-step
            staging = torch.zeros(owner.unit.padded, dtype=self.dtype, device=owner.unit.full.device)
        owner.staging = None
        first, owner.reduced_once = not owner.reduced_once, True
        if first and owner.grad is not None:  # the first micro-step since zero_grad: straight into the shard
            handle = self._reduce_scatter(staging, owner.grad)
            self._pending.append((handle, lambda: _release(staging)))
        else:
            reduced = torch.empty(owner.unit.shard_numel, dtype=self.dtype, device=staging.device)
            handle = self._reduce_scatter(staging, reduced)
            accumulate = self._accumulate(owner, reduced, first)

            def finish() -> None:
                accumulate()
                _release(staging)

            self._pending.append((handle, finish))
        # each reduce-scatter in flight holds a unit's full-size gradients: keep at most two in flight.
        # Once finished they are released at once, not at their last reference: the backend may hold
        # them a while (Gloo until its worker thread next runs -- on a busy machine, several units'
        # worth by the end of a backward)
        self._drain(keep=1 if self.config.overlap_comm else 0)

    def _reduce_scatter(self, staging: torch.Tensor, out: torch.Tensor) -> Handle:
        """Average ``staging`` over the ranks into this rank's ``out``: exactly, or as int8 blocks (qgZ)."""
        if self._grad_codec is not None:
            return quantized_reduce_scatter(self.comm, staging, self._grad_codec, "avg", out=out, async_op=True)
        return self.comm.reduce_scatter(staging, "avg", out=out, async_op=True, consume_input=True)

    def _accumulate(self, owner: UnitOwner, reduced: torch.Tensor, first: bool) -> Callable[[], None]:
        """Add a micro-step's reduced gradient to the owner's shard, on the device or in the store."""
        def finish() -> None:
            if owner.grad is not None:
                owner.grad.add_(reduced)
                return
            assert owner.grad_key is not None
            if first:
                self.store.put(owner.grad_key, reduced)
                return
            grad = self.store.get(owner.grad_key)
            grad.add_(reduced.to(grad.device))
            self.store.put(owner.grad_key, grad)

        return finish

    def _finish_backward(self) -> None:
        if self._phase != "backward":
            return
        self._launch_ready(flush=True)
        self._drain()
        for owner in self.owners:
            owner.arrived, owner.staging = 0, None
        for u in self.units:
            u.release()
        self._next_reduce = 0
        self._backward_trace.finish()
        self._phase = "idle"

