"""Partitioned construction (DeepSpeed's ``zero.Init``): build a model that never exists whole.

Under :func:`partitioned`, a module's own parameters are partitioned the moment
its ``__init__`` returns -- its initialisation has run by then, and its children
were partitioned when theirs returned -- so a rank holds its shards of everything
built so far plus one module's full parameters, even when layers are built in a
list before anything holds them. The end of each ``__init__`` is observed with
``sys.setprofile`` for the duration of the block (``sys.settrace`` under a profiler
installed from C, such as torch's with ``with_stack=True``); no module class and no
torch function is patched.

Initialisation code that runs after its modules were partitioned -- an init loop
over ``self.modules()`` at the end of a model's ``__init__``, ``self.apply(fn)``,
``p.data.normal_()`` -- works unchanged inside the block and gives exactly the
values eager construction gives: the first op that reads or writes a released
parameter gathers it (a collective, so every rank must run the same init code, as
they already build the same model), and it stays whole until more than one
module's worth of parameters is open, when the oldest is closed: ``src_rank``'s
values are broadcast and each rank keeps its shard. Since ``src_rank`` draws its
random numbers in eager order, its values are eager's, bit for bit. The block's
end closes the rest. After the block, a change goes through
``zero_optim.gathered(params, modifier_rank=0)``.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import torch
from torch import nn

from zero_comm import Communicator

from ._partition import GatherUnit, PartitionedParameter, state_dict_placeholders

__all__ = ["partitioned"]


def _partition_direct(module: nn.Module, comm: Communicator, dtype: torch.dtype | None,
                      src_rank: int) -> list[GatherUnit]:
    return [GatherUnit([p], comm, dtype, names=[f"{type(module).__name__}.{name}"], src_rank=src_rank)
            for name, p in list(module.named_parameters(recurse=False)) if not isinstance(p, PartitionedParameter)]


def _name_by_path(roots: list[nn.Module]) -> None:
    """Name each partitioned parameter of ``roots`` by its path in its model (``blocks.0.attn.qkv.weight``),
    as errors and checkpoints show it."""
    for root in roots:
        for name, p in root.named_parameters():
            if isinstance(p, PartitionedParameter):
                p.zero.name = name
        state_dict_placeholders(root)


class _OpenForInit:
    """Units that initialisation code gathered inside the block, oldest first, with at most one
    module's worth of full parameters open at once (more only for a single larger unit)."""

    def __init__(self, src_rank: int):
        self.src_rank = src_rank
        self.units: dict[int, GatherUnit] = {}  # oldest first
        self.budget = 0  # the most full elements one module built in the block holds

    def open(self, unit: GatherUnit, param: PartitionedParameter) -> bool:
        for old in [u for u in self.units.values() if not u.pinned]:  # oldest first; not the op's others
            if sum(u.padded for u in self.units.values()) + unit.padded <= self.budget:
                break
            self.close(old)
        unit.gather()
        self.units[id(unit)] = unit
        return True

    def close(self, unit: GatherUnit, keep: bool = True) -> None:
        del self.units[id(unit)]
        if keep:
            unit.scatter_back(self.src_rank)
        unit.release()

    def close_all(self, keep: bool) -> None:
        for unit in list(self.units.values()):
            self.close(unit, keep)


@contextmanager
def partitioned(comm: Communicator, *, dtype: torch.dtype | None = None, src_rank: int = 0) -> Iterator[None]:
    """Partition the parameters of every module built in the block over ``comm``'s ranks.

    Every rank must build the same model (each parameter is broadcast from
    ``src_rank`` as it is partitioned, so all ranks agree on the initial weights
    whatever their random state). ``dtype`` casts the shards (e.g.
    ``torch.bfloat16``); ``None`` keeps each parameter's own. Hand the model to
    ``ZeroStage3`` to train it.
    """
    depth: dict[int, int] = {}  # module -> __init__ frames of it still running (subclass inits nest)
    opened = _OpenForInit(src_rank)
    built: list[weakref.ref[nn.Module]] = []
    units: list[weakref.ref[GatherUnit]] = []

    def module_init(frame: FrameType) -> nn.Module | None:
        if frame.f_code.co_name != "__init__" or not frame.f_code.co_argcount:
            return None
        module = frame.f_locals.get(frame.f_code.co_varnames[0])
        return module if isinstance(module, nn.Module) else None

    def entered(module: nn.Module) -> None:
        depth[id(module)] = depth.get(id(module), 0) + 1

    def returned(module: nn.Module) -> None:
        key = id(module)
        if key in depth:
            depth[key] -= 1
            if not depth[key]:
                del depth[key]
                made = _partition_direct(module, comm, dtype, src_rank)
                for unit in made:
                    unit.on_released_use = opened.open
                    units.append(weakref.ref(unit))
                opened.budget = max(opened.budget, sum(u.padded for u in made))
                built.append(weakref.ref(module))

    try:
        with _observing_init_frames(module_init, entered, returned):
            yield
    except BaseException:
        opened.close_all(keep=False)  # no collective: the other ranks may not be here
        raise
    finally:
        for ref in units:
            if (unit := ref()) is not None and unit.on_released_use == opened.open:
                unit.on_released_use = None
    opened.close_all(keep=True)
    modules = [m for ref in built if (m := ref()) is not None]
    inner = {id(c) for m in modules for c in m.modules() if c is not m}
    _name_by_path([m for m in modules if id(m) not in inner])


@contextmanager
def _observing_init_frames(module_init: Callable[[FrameType], nn.Module | None],
                           entered: Callable[[nn.Module], None],
                           returned: Callable[[nn.Module], None]) -> Iterator[None]:
    """Call ``entered``/``returned`` as each module ``__init__`` frame starts and ends.

    The profile hook is the cheap one (call and return events only) and chains to a
    Python profiler already installed. A profiler installed from C (torch's profiler
    with ``with_stack=True``) cannot be chained from Python nor put back once
    replaced, so under one the trace hook is used instead, leaving it untouched.
    """
    previous = sys.getprofile()
    if previous is None or callable(previous):

        def observe(frame: FrameType, event: str, arg: Any) -> None:
            if previous is not None:
                previous(frame, event, arg)  # type: ignore[arg-type]
            if event in ("call", "return") and (module := module_init(frame)) is not None:
                (entered if event == "call" else returned)(module)

        sys.setprofile(observe)
        try:
            yield
        finally:
            sys.setprofile(previous)
        return
    if sys.gettrace() is not None:
        raise RuntimeError(
            "partitioned construction observes each module's __init__ with sys.setprofile or "
            f"sys.settrace, and both are taken here (profile: {type(previous).__name__}, trace: "
            f"{type(sys.gettrace()).__name__}); build the model outside the profiler or debugger")

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        module = module_init(frame) if event == "call" else None
        if module is None:
            return None
        entered(module)

        def local(frame: FrameType, event: str, arg: Any) -> Any:
            if event == "return":
                returned(module)
            return local

        return local

    sys.settrace(trace)
    try:
        yield
    finally:
        sys.settrace(None)
