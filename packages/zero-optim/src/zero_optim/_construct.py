"""Partitioned construction (DeepSpeed's ``zero.Init``): build a model that never exists whole.

Under :func:`partitioned`, a module's own parameters are partitioned the moment
its ``__init__`` returns -- its initialisation has run by then, and its children
were partitioned when theirs returned -- so a rank holds its shards of everything
built so far plus one module's full parameters, even when layers are built in a
list before anything holds them. The end of each ``__init__`` is observed with
``sys.setprofile`` for the duration of the block (``sys.settrace`` under a profiler
installed from C, such as torch's with ``with_stack=True``); no module class and no
torch function is patched.

Code that changes parameters after they are partitioned (a custom init loop at the
end of a model's ``__init__``, loading weights) wraps the change in
``zero_optim.gathered(params, modifier_rank=0)``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import torch
from torch import nn

from zero_comm import Communicator

from ._partition import GatherUnit, PartitionedParameter

__all__ = ["partitioned"]


def _partition_direct(module: nn.Module, comm: Communicator, dtype: torch.dtype | None, src_rank: int) -> None:
    for name, p in list(module.named_parameters(recurse=False)):
        if not isinstance(p, PartitionedParameter):
            GatherUnit([p], comm, dtype, names=[f"{type(module).__name__}.{name}"], src_rank=src_rank)


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
                _partition_direct(module, comm, dtype, src_rank)

    with _observing_init_frames(module_init, entered, returned):
        yield


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
