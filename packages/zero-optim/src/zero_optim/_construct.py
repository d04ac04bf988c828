"""Partitioned construction (DeepSpeed's ``zero.Init``): build a model that never exists whole.

Under :func:`partitioned`, each module's parameters are partitioned as soon as the
module is attached to its parent -- its own ``__init__`` (and so its
initialisation) has finished by then -- so a rank holds its shards of everything
built so far plus one module's full parameters. Parameters registered on a module
that is never attached to a parent (the root) are partitioned when the block ends.
It works through torch's global registration hooks, which exist only while the
block runs; no module class and no torch function is patched.

Code that changes parameters after they are partitioned (a custom init loop at the
end of a model's ``__init__``, loading weights) wraps the change in
``zero_optim.gathered(params, modifier_rank=0)``.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules import module as module_hooks

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

    Every rank must build the same model (the construction broadcasts each
    parameter from ``src_rank``, so all ranks agree on the initial weights whatever
    their random state). ``dtype`` casts the shards (e.g. ``torch.bfloat16``);
    ``None`` keeps each parameter's own. Hand the model to ``ZeroStage3`` to train.
    """
    seen: list[weakref.ref[nn.Module]] = []

    def on_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if not seen or seen[-1]() is not module:
            seen.append(weakref.ref(module))

    def on_child(parent: nn.Module, name: str, child: nn.Module) -> None:
        for m in child.modules():
            _partition_direct(m, comm, dtype, src_rank)

    hooks = [module_hooks.register_module_parameter_registration_hook(on_parameter),
             module_hooks.register_module_module_registration_hook(on_child)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
    for ref in seen:
        m = ref()
        if m is not None:
            _partition_direct(m, comm, dtype, src_rank)
