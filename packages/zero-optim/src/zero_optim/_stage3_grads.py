"""A sharded module's gradients: staged per unit as they arrive, reduce-scattered to their owners.

Each unit with trainable parameters has a :class:`UnitGrads`: this rank's gradient
shard and the unit's staging buffer. A parameter's post-accumulate hook copies its
gradient into the unit's full-size staging buffer; once every trainable parameter of
the unit has arrived the unit is released and, in one order every rank shares (the
reverse of each unit's first use in the recorded forward), its staging buffer is
reduce-scattered to the owners -- plainly, or with ``quantized_gradients`` as int8
blocks exchanged by one all-to-all (ZeRO++'s qgZ) -- and accumulated into the
gradient shard, on the device or in a store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from zero_comm import Handle, quantized_reduce_scatter

from ._partition import GatherUnit, _release

if TYPE_CHECKING:
    from zero_comm import Communicator, RowCodec

    from ._store import StateStore

__all__ = ["GradientReducer", "UnitGrads"]


@dataclass
class UnitGrads:
    """One unit's gradients on this rank: its reduced shard (accumulated over micro-steps) and the
    full-size staging buffer of the micro-step in progress."""

    unit: GatherUnit
    grad: torch.Tensor | None  # the reduced gradient of this rank's shard, accumulated over micro-steps
    trainable: int  # parameters that get a gradient
    grad_key: str | None = None  # offload_param: the gradient shard lives in a store instead
    arrived: int = 0
    staging: torch.Tensor | None = None  # full-size gradients of this micro-step, rank-major
    reduced_once: bool = False  # a micro-step was reduced since the shard was last cleared


class GradientReducer:
    """Reduce-scatters units' gradients as they complete, in one order every rank shares.

    ``forward_order`` gives the units in the order the last forward first used them
    (their gradients complete in the reverse); ``on_first_grad`` runs when a gradient
    arrives outside a backward the owner started (``loss.backward()`` called directly).
    """

    def __init__(self, grads: list[UnitGrads], comm: Communicator, dtype: torch.dtype, *,
                 store: StateStore, codec: RowCodec | None, overlap: bool,
                 forward_order: Callable[[], list[GatherUnit]], on_first_grad: Callable[[], None]):
        self.grads, self.comm, self.dtype, self.store = grads, comm, dtype, store
        self._codec, self._overlap = codec, overlap
        self._forward_order, self._on_first_grad = forward_order, on_first_grad
        self._of = {id(g.unit): g for g in grads}
        self._order: list[UnitGrads] | None = None
        self._next = 0
        # reductions in flight, each with what to do once it has finished
        self._pending: list[tuple[Handle, Callable[[], object]]] = []

    def hook(self, g: UnitGrads, p: nn.Parameter) -> Callable[[torch.Tensor], None]:
        """The post-accumulate-grad hook of ``p``, a trainable parameter of ``g.unit``."""
        unit = g.unit
        i = next(k for k, q in enumerate(unit.params) if q is p)
        off, numel = unit.offsets[i], p.numel()

        def hook(param: torch.Tensor) -> None:
            grad = param.grad
            param.grad = None  # the gradient shards own gradients from here on
            if grad is None:
                return
            self._on_first_grad()
            if g.staging is None:
                g.staging = torch.zeros(unit.padded, dtype=self.dtype, device=grad.device)
            g.staging[off:off + numel].view(param.shape).copy_(grad)
            g.arrived += 1
            if g.arrived == g.trainable:
                unit.release()
                self._launch_ready(flush=False)

        return hook

    def _launch_ready(self, flush: bool) -> None:
        """Reduce-scatter complete units in the shared order; with ``flush`` the rest too (a gradient
        that never came counts as zero)."""
        if self._order is None:
            # a unit's gradients are complete once the backward of its *first* use in forward has run
            # (a tied embedding, read again by the head, completes last): reduce in reverse first use
            order = [self._of[id(u)] for u in reversed(list(dict.fromkeys(self._forward_order())))
                     if id(u) in self._of]
            self._order = order + [g for g in self.grads if g not in order]
        while self._next < len(self._order):
            g = self._order[self._next]
            if not flush and g.arrived < g.trainable:
                return
            self._reduce(g)
            self._next += 1

    def _reduce(self, g: UnitGrads) -> None:
        staging = g.staging
        if staging is None:  # no parameter of this unit got a gradient in this micro-step
            staging = torch.zeros(g.unit.padded, dtype=self.dtype, device=g.unit.full.device)
        g.staging = None
        first, g.reduced_once = not g.reduced_once, True
        if first and g.grad is not None:  # the first micro-step since the shard was cleared: straight in
            handle = self._reduce_scatter(staging, g.grad)
            self._pending.append((handle, lambda: _release(staging)))
        else:
            reduced = torch.empty(g.unit.shard_numel, dtype=self.dtype, device=staging.device)
            handle = self._reduce_scatter(staging, reduced)
            accumulate = self._accumulate(g, reduced, first)

            def finish() -> None:
                accumulate()
                _release(staging)

            self._pending.append((handle, finish))
        # each reduce-scatter in flight holds a unit's full-size gradients: keep at most two in flight.
        # Once finished they are released at once, not at their last reference: the backend may hold
        # them a while (Gloo until its worker thread next runs -- on a busy machine, several units'
        # worth by the end of a backward)
        self.drain(keep=1 if self._overlap else 0)

    def _reduce_scatter(self, staging: torch.Tensor, out: torch.Tensor) -> Handle:
        """Average ``staging`` over the ranks into this rank's ``out``: exactly, or as int8 blocks (qgZ)."""
        if self._codec is not None:
            return quantized_reduce_scatter(self.comm, staging, self._codec, "avg", out=out, async_op=True)
        return self.comm.reduce_scatter(staging, "avg", out=out, async_op=True, consume_input=True)

    def _accumulate(self, g: UnitGrads, reduced: torch.Tensor, first: bool) -> Callable[[], None]:
        """Add a micro-step's reduced gradient to the unit's shard, on the device or in the store."""
        def finish() -> None:
            if g.grad is not None:
                g.grad.add_(reduced)
                return
            assert g.grad_key is not None
            if first:
                self.store.put(g.grad_key, reduced)
                return
            grad = self.store.get(g.grad_key)
            grad.add_(reduced.to(grad.device))
            self.store.put(g.grad_key, grad)

        return finish

    def drain(self, keep: int = 0) -> None:
        """Wait for all but the newest ``keep`` reductions in flight, running each one's follow-up."""
        while len(self._pending) > keep:
            handle, finish = self._pending.pop(0)
            handle.wait()
            finish()

    def finish(self) -> None:
        """End of a backward: reduce every unit (those with no gradient as zeros) and wait for all."""
        self._launch_ready(flush=True)
        self.drain()
        for g in self.grads:
            g.arrived, g.staging = 0, None
        self._next = 0

    def clear(self) -> None:
        """Zero the gradient shards: the next micro-step's reduction starts them afresh."""
        self.drain()
        for g in self.grads:
            if g.grad is not None:
                g.grad.zero_()
            g.reduced_once = False
