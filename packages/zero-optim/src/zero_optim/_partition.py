"""Partitioned parameters (ZeRO stage 3): one parameter's sharded life and the unit that gathers it.

A :class:`GatherUnit` is the parameters gathered together, normally one module's:
flattened end to end into one buffer, padded to a multiple of the world size and
cut into equal chunks, rank ``r`` keeping chunk ``r`` (the rule
:func:`zero_comm.shard_range` states). One all-gather straight into that buffer
brings the whole module back, with each parameter a view of it -- nothing to
unpack -- and its gradients go back to their owners the same way, by one
reduce-scatter. A rank's shard can start or end inside a parameter; each
parameter's :class:`ParamShard` says which of its elements this rank holds.

The full parameter keeps its shape and its place in the module; only its storage
comes and goes (the storage is resized to zero bytes when released, which frees
the memory even where autograd saved a view of the weight, and resized back when
gathered again). A partitioned parameter is a :class:`PartitionedParameter`, whose
torch-function check turns an op on a released parameter into an error that says
how to gather it, instead of a read of freed memory.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from zero_comm import Communicator, Handle

from ._store import StateStore

__all__ = ["GatherUnit", "ParamShard", "PartitionedParameter", "PartitionedParameterError", "gathered",
           "state_dict_placeholders"]


class PartitionedParameterError(RuntimeError):
    """A partitioned parameter was read or changed while only this rank's shard of it exists."""


@dataclass
class ParamShard:
    """What a rank keeps of one partitioned parameter."""

    name: str
    unit: GatherUnit
    start: int  # the elements of the flattened parameter this rank holds: [start, stop) ...
    stop: int
    at: int  # ... at this offset in the unit's shard

    @property
    def shard(self) -> torch.Tensor:
        """This rank's elements of the parameter (a view into the unit's shard; may be empty)."""
        if self.unit.home is not None:
            raise RuntimeError(f"parameter {self.name!r}'s shard is offloaded to a store: read it inside "
                               "`with unit.local_shard() as shard:`")
        return self.unit.shard[self.at:self.at + self.stop - self.start]


# Ops that only read metadata (or are needed to manage the parameter) work while it is released.
_METADATA_OPS = frozenset({
    "__get__", "__set__", "__delete__", "size", "dim", "numel", "nelement", "element_size", "data_ptr",
    "is_floating_point", "is_complex", "register_hook", "register_post_accumulate_grad_hook", "requires_grad_",
    "__hash__", "untyped_storage", "_is_view", "is_contiguous", "stride", "storage_offset", "__repr__",
    "__format__", "__reduce_ex__", "__setstate__", "get_device", "type",
})
_DATA = torch._C.TensorBase.data  # whose getter hands out the storage itself: a read of the values


def _reads_values(func: Any) -> bool:
    name = getattr(func, "__name__", None)
    return name not in _METADATA_OPS or (name == "__get__" and getattr(func, "__self__", None) is _DATA)


class PartitionedParameter(nn.Parameter):
    """An ``nn.Parameter`` whose data exists whole only while it is gathered.

    Outside a gathered context and outside the forward of a module that owns it,
    any op that reads or writes its values raises :class:`PartitionedParameterError`.
    ``zero`` is its :class:`ParamShard`.
    """

    zero: ParamShard

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if kwargs is None:
            kwargs = {}
        if _STATE_DICT.depth and getattr(func, "__name__", None) == "detach" and args and \
                type(args[0]) is PartitionedParameter and not args[0].zero.unit.gathered:
            p = args[0]  # Module.state_dict() of a partitioned model: its keys and shapes, no values
            return torch.empty(p.shape, dtype=p.dtype, device="meta")
        if _reads_values(func):
            flat = (a for arg in (*args, *kwargs.values()) for a in (arg if isinstance(arg, (list, tuple)) else (arg,)))
            params = [a for a in flat if type(a) is PartitionedParameter]
            if any(not p.zero.unit.gathered for p in params):
                units = {id(p.zero.unit): p.zero.unit for p in params}.values()
                for unit in units:
                    unit.pinned += 1  # this op reads them all: gathering one must not release another
                try:
                    for p in params:
                        if not p.zero.unit.gathered:
                            p.zero.unit.use_released(p, func)
                finally:
                    for unit in units:
                        unit.pinned -= 1
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    def __repr__(self, *args: Any, **kwargs: Any) -> str:  # type: ignore[override]
        z = self.zero
        state = "gathered" if z.unit.gathered else f"partitioned, this rank holds {z.stop - z.start} elements"
        return f"PartitionedParameter({z.name!r}, shape={tuple(self.shape)}, dtype={self.dtype}, {state})"


class _StateDictDepth(threading.local):
    depth = 0


_STATE_DICT = _StateDictDepth()  # > 0 while a module holding partitioned parameters saves its state_dict


def _enter_state_dict(*_: Any) -> None:
    _STATE_DICT.depth += 1


def _leave_state_dict(*_: Any) -> None:
    _STATE_DICT.depth -= 1


def state_dict_placeholders(root: nn.Module) -> None:
    """Let ``root.state_dict()`` run while its parameters are partitioned: each released parameter appears as a
    ``meta`` tensor of its shape and dtype (DeepSpeed puts an empty tensor there), so code that needs a
    partitioned model's keys and shapes (Hugging Face's ``from_pretrained`` under ZeRO-3) works, while a
    meta tensor can never be mistaken for, or saved as, the weights. Any other use of a released parameter
    still raises. Idempotent."""
    for module in root.modules():
        if getattr(module, "_zero_state_dict_hooks", False) or not any(
                type(p) is PartitionedParameter for p in module.parameters(recurse=False)):
            continue
        module.register_state_dict_pre_hook(_enter_state_dict)
        post = getattr(module, "register_state_dict_post_hook", None) or module._register_state_dict_hook
        post(_leave_state_dict)
        module._zero_state_dict_hooks = True  # type: ignore[assignment]


class GatherRoute(Protocol):
    """How a unit's training gathers travel instead of a plain all-gather (ZeRO++: see ``_zeropp``)."""

    def launch(self, unit: GatherUnit, shard: torch.Tensor) -> Handle: ...
    def invalidate(self) -> None: ...


def _release(t: torch.Tensor) -> None:
    t.untyped_storage().resize_(0)


class GatherUnit:
    """Parameters gathered and released together (normally one module's), one flat shard per rank.

    Built from full parameters (each rank keeps its chunk after one broadcast from
    ``src_rank``, so every rank agrees) or from parameters an earlier unit
    partitioned (each is gathered there, one at a time, and regrouped here). The
    parameters are released when it is built, unless ``persistent``: a persistent
    unit is gathered once and stays whole (small parameters, where a gather costs
    more than the memory it saves).
    """

    def __init__(self, params: list[nn.Parameter], comm: Communicator, dtype: torch.dtype | None = None, *,
                 names: list[str] | None = None, persistent: bool = False, src_rank: int = 0):
        if not params:
            raise ValueError("a GatherUnit needs at least one parameter")
        self.params, self.comm, self.persistent = params, comm, persistent
        self.dtype = dtype or params[0].dtype
        device = params[0].device
        n, r = comm.world_size, comm.rank
        self.offsets = [sum(q.numel() for q in params[:i]) for i in range(len(params))]
        self.numel = sum(p.numel() for p in params)
        self.shard_numel = math.ceil(self.numel / n)
        self.padded = self.shard_numel * n
        p0 = params[0]
        single = (len(params) == 1 and not isinstance(p0, PartitionedParameter) and p0.dtype == self.dtype
                  and p0.is_contiguous() and self.padded == self.numel)
        # The full buffer: a lone full parameter's own storage (no copy), else a new one. Either way a
        # tensor of its own, so writing it does not bump the parameter's version counter (autograd would
        # take a gather between forward and backward for an in-place change of a saved weight).
        self.full = torch.zeros(0 if single else self.padded, dtype=self.dtype, device=device)
        if single:
            self.full.set_(p0.untyped_storage(), p0.storage_offset(), (self.numel,), (1,))
        plain = [not isinstance(p, PartitionedParameter) for p in params]
        for p, off, is_plain in zip(params, self.offsets, plain, strict=True):
            if single:
                break
            if is_plain:
                self.full[off:off + p.numel()].copy_(p.detach().reshape(-1))
            else:  # partitioned by another unit: gather it there, one parameter at a time
                old = p.zero.unit  # type: ignore[attr-defined]
                was = old.gathered
                old.gather()
                with torch._C.DisableTorchFunctionSubclass():
                    self.full[off:off + p.numel()].copy_(p.detach().reshape(-1))
                if not was:
                    old.release()
        if any(plain) and n > 1:
            self.comm.broadcast(self.full, src_rank)  # every rank starts from the same weights
        self.shard = self.full[r * self.shard_numel:(r + 1) * self.shard_numel].clone()
        self.on_change: list[Callable[[GatherUnit], None]] = []  # called after gathered(modifier_rank=...)
        self.on_released_use: Callable[[GatherUnit, PartitionedParameter], bool] | None = None
        self.pinned = 0  # ops now reading this unit's parameters: not to be released to make room
        self.home: tuple[StateStore, str] | None = None  # where the shard lives when offloaded
        self._handle: Handle | None = None
        self._borrowed: str | None = None  # the store key an all-gather in flight reads from
        self.route: GatherRoute | None = None  # how training's gathers travel (ZeRO++: int8, or in the node)
        self.exact = True  # the gathered values are the shards' own (not decoded int8, not a node copy)
        self._pending_exact = True
        lo = r * self.shard_numel
        for i, (p, off, is_plain) in enumerate(zip(params, self.offsets, plain, strict=True)):
            start = min(max(lo - off, 0), p.numel())
            stop = max(min(lo + self.shard_numel - off, p.numel()), start)
            fallback = f"param of shape {tuple(p.shape)}" if is_plain else p.zero.name  # type: ignore[attr-defined]
            name = names[i] if names and names[i] else fallback
            p.data = self.full[off:off + p.numel()].view(p.shape)
            if is_plain:
                p.__class__ = PartitionedParameter
            p.zero = ParamShard(name, self, start, stop, off + start - lo)  # type: ignore[attr-defined]
        self.gathered = True
        self.release()
        if persistent:
            self.gather()

    # -- state ------------------------------------------------------------------------------
    @property
    def in_flight(self) -> bool:
        return self._handle is not None

    @property
    def live_numel(self) -> int:
        """Elements of full parameters this unit holds now (gathered or being gathered)."""
        return self.padded if (self.gathered or self.in_flight) else 0

    def gather(self, async_op: bool = False, *, exact: bool = True) -> None:
        """Bring the full parameters back (a collective: every rank must call it, in the same order).

        ``async_op`` only launches the all-gather; the next ``gather()`` or ``wait()`` completes it.
        ``exact=False`` lets the unit's :attr:`route` carry it (a training step's gathers under ZeRO++:
        int8 blocks, or the node group's copy); an exact gather of a unit gathered that way gathers again."""
        if self._handle is not None and exact and not self._pending_exact:
            self.wait()
        if self.gathered and (self.exact or not exact):
            return
        if self._handle is None:
            self.full.untyped_storage().resize_(self.padded * self.full.element_size())
            shard = self.shard
            if self.home is not None:  # offloaded: the store reads it (ahead, if it was told the order)
                store, key = self.home
                shard = store.get(key)
                if shard.device != self.full.device:
                    shard = shard.to(self.full.device)
                    store.release(key)
                else:
                    self._borrowed = key
            route = None if exact else self.route
            self._pending_exact = route is None
            self._handle = (self.comm.all_gather(shard, out=self.full, async_op=True) if route is None
                            else route.launch(self, shard))
        if not async_op:
            self.wait()

    def wait(self) -> None:
        """Finish an all-gather started by ``gather(async_op=True)``."""
        if self._handle is None:
            return
        self._handle.wait()
        self._handle = None
        self.gathered, self.exact = True, self._pending_exact
        if self._borrowed is not None and self.home is not None:
            self.home[0].release(self._borrowed)
            self._borrowed = None

    def offload(self, store: StateStore, key: str) -> None:
        """Move this rank's shard into ``store`` under ``key`` (ZeRO-Infinity): from now on it is read
        from there for each gather and written there by each update."""
        if self.persistent:
            raise ValueError("a persistent unit stays whole on the device; it has nothing to offload")
        store.create(key, self.shard)
        self.home = (store, key)
        self.shard = self.shard.new_empty(0)

    @contextmanager
    def local_shard(self, write: bool = False) -> Iterator[torch.Tensor]:
        """This rank's shard for the body of a ``with`` block, wherever it lives; with ``write`` the
        body's changes are kept (written back to the store)."""
        if self.home is None:
            yield self.shard
            return
        store, key = self.home
        shard = store.get(key)
        try:
            yield shard
        except BaseException:
            store.release(key)
            raise
        if write:
            store.put(key, shard)
        else:
            store.release(key)

    def release(self, force: bool = False) -> None:
        """Drop the full parameters (persistent units keep them unless forced); this rank's shard stays."""
        if self.persistent and not force:
            return
        if self._handle is not None:
            self.wait()
        if self.gathered:
            _release(self.full)
            self.gathered = False

    def refresh(self) -> None:
        """After the shard changed (an optimizer step): a persistent unit gathers the new values, and a
        route's copies of the old ones are stale."""
        if self.route is not None:
            self.route.invalidate()
        if self.persistent:
            self.release(force=True)
            self.gather()

    def scatter_back(self, src_rank: int) -> None:
        """Make ``src_rank``'s full parameters everyone's, and keep this rank's chunk of them."""
        if self.comm.world_size > 1:
            self.comm.broadcast(self.full, src_rank)
        r = self.comm.rank
        with self.local_shard(write=True) as shard:
            shard.copy_(self.full[r * self.shard_numel:(r + 1) * self.shard_numel])
        if self.route is not None:
            self.route.invalidate()
        for callback in self.on_change:
            callback(self)

    def use_released(self, param: PartitionedParameter, func: Any) -> None:
        """An op touched ``param`` while it is released: gather it if the optimizer running the model
        allows that here (inside a module's forward), else say how to gather it."""
        if self.on_released_use is not None and self.on_released_use(self, param):
            return
        what = "reading .data" if getattr(func, "__self__", None) is _DATA else f"{getattr(func, '__name__', func)}()"
        z = param.zero
        kept = (f"this rank keeps only elements [{z.start}, {z.stop}) of its {param.numel()}"
                if self.comm.world_size > 1 else "only its flat shard is kept (all of its elements, on this one rank)")
        raise PartitionedParameterError(
            f"parameter {z.name!r} (shape {tuple(param.shape)}) is partitioned by ZeRO stage 3 and released here: "
            f"{kept}, and the tensor itself has no storage between uses, so {what} cannot use it. Gather it "
            "first: `with zero_optim.gathered(params, modifier_rank=0):` (DeepSpeed's "
            "`deepspeed.zero.GatheredParameters`) to change it, rank 0's change being kept, modifier_rank=None "
            "to read it; or use it inside the forward of the model a stage-3 optimizer runs. Initialisation "
            "code inside the `zero.Init` / `zero_optim.partitioned` block needs neither.")


@contextmanager
def gathered(params: nn.Parameter | Iterable[nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
    """Make partitioned parameters whole for the body of a ``with`` block (DeepSpeed's GatheredParameters).

    Every rank must enter it (it all-gathers). With ``modifier_rank`` the body may
    change the parameters; on exit that rank's values are broadcast and every rank
    keeps its shard of them (and an optimizer updates its master weights). With
    ``None`` changes are dropped. Parameters that are not partitioned pass through.
    """
    items = [params] if isinstance(params, torch.Tensor) else list(params)
    units: list[GatherUnit] = []
    for p in items:
        if isinstance(p, PartitionedParameter) and p.zero.unit not in units:
            units.append(p.zero.unit)
    opened = [u for u in units if not u.gathered]
    for u in units:
        u.gather()
    try:
        yield
    except BaseException:
        for u in opened:
            u.release()
        raise
    if modifier_rank is not None:
        for u in units:
            u.scatter_back(modifier_rank)
    for u in opened:
        u.release()
