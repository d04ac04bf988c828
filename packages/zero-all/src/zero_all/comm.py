"""``deepspeed.comm``: DeepSpeed's collective functions over torch.distributed and zero-comm.

Same names and arguments as DeepSpeed's (``group`` is a torch process group, ``None``
for the world; ranks passed as ``src``/``dst`` are global ranks, as in torch). The flat
collectives (``all_reduce``, ``all_gather_into_tensor``, ``reduce_scatter_tensor``,
``broadcast``, ``send``/``recv``, ``barrier``) run through a
:class:`zero_comm.ProcessGroupCommunicator`, so they are booked in zero-comm's ledger
and ``ReduceOp.AVG`` works on Gloo too; the list and object forms
(``all_gather``, ``all_gather_object``, ``broadcast_object_list``) and
``monitored_barrier`` go to torch.distributed.
"""

from __future__ import annotations

import enum
from typing import Any

import torch
import torch.distributed as dist

import zero_comm

from ._engine import init_distributed

__all__ = [
    "ReduceOp",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_reduce",
    "barrier",
    "broadcast",
    "broadcast_object_list",
    "destroy_process_group",
    "get_global_rank",
    "get_local_rank",
    "get_rank",
    "get_world_group",
    "get_world_size",
    "init_distributed",
    "irecv",
    "is_available",
    "is_initialized",
    "isend",
    "monitored_barrier",
    "new_group",
    "recv",
    "reduce_scatter_tensor",
    "send",
]


class ReduceOp(enum.Enum):
    """DeepSpeed's reduce operations (torch's ``dist.ReduceOp`` values are accepted too)."""

    SUM = 0
    PRODUCT = 1
    MIN = 2
    MAX = 3
    BAND = 4
    BOR = 5
    BXOR = 6
    AVG = 7
    UNUSED = 8


_ZERO_OPS = {ReduceOp.SUM: "sum", ReduceOp.PRODUCT: "product", ReduceOp.MIN: "min", ReduceOp.MAX: "max",
             ReduceOp.AVG: "avg"}
_TORCH_NAMES = {"SUM": ReduceOp.SUM, "PRODUCT": ReduceOp.PRODUCT, "MIN": ReduceOp.MIN, "MAX": ReduceOp.MAX,
                "AVG": ReduceOp.AVG}


def _op(op: Any) -> Any:
    """zero-comm's name of ``op`` (a DeepSpeed or torch reduce op)."""
    if isinstance(op, dist.ReduceOp.RedOpType):
        op = _TORCH_NAMES.get(op.name, op)
    if op not in _ZERO_OPS:
        raise ValueError(f"deepspeed.comm: reduce op {op} is not supported; zero reduces with SUM, PRODUCT, MIN, "
                         "MAX and AVG")
    return _ZERO_OPS[op]


def _comm(group: Any) -> zero_comm.ProcessGroupCommunicator:
    if not dist.is_initialized():
        raise RuntimeError("deepspeed.comm is not initialised: call deepspeed.init_distributed() first")
    return zero_comm.ProcessGroupCommunicator(group, name="world" if group is None else "deepspeed.comm")


def _group_rank(group: Any, global_rank: int) -> int:
    return global_rank if group is None else dist.get_group_rank(group, global_rank)


# -- state ----------------------------------------------------------------------------------------
def is_available() -> bool:
    return dist.is_available()


def is_initialized() -> bool:
    return dist.is_initialized()


def get_rank(group: Any = None) -> int:
    return _comm(group).rank


def get_world_size(group: Any = None) -> int:
    return _comm(group).world_size


def get_local_rank() -> int:
    """This process's rank on its node, as its launcher set it."""
    _comm(None)
    return zero_comm.detect_launch_env().local_rank


def get_global_rank(group: Any = None, group_rank: int = 0) -> int:
    return _comm(group).global_rank(group_rank)


def get_world_group() -> Any:
    _comm(None)
    return dist.group.WORLD


def new_group(ranks: list[int]) -> Any:
    _comm(None)
    return dist.new_group(ranks)


def destroy_process_group(group: Any = None) -> None:
    dist.destroy_process_group(group)


# -- collectives ------------------------------------------------------------------------------------
def all_reduce(tensor: torch.Tensor, op: Any = ReduceOp.SUM, group: Any = None, async_op: bool = False) -> Any:
    """Reduce ``tensor`` in place across ``group``; with ``async_op`` returns a handle to ``wait()`` on."""
    out = _comm(group).all_reduce(tensor, _op(op), async_op=async_op)
    return out if async_op else None


def all_gather(tensor_list: list[torch.Tensor], tensor: torch.Tensor, group: Any = None,
               async_op: bool = False) -> Any:
    """Every rank's ``tensor`` into ``tensor_list`` (torch.distributed's list form)."""
    _comm(group)
    return dist.all_gather(tensor_list, tensor, group=group, async_op=async_op)


def all_gather_into_tensor(output_tensor: torch.Tensor, tensor: torch.Tensor, group: Any = None,
                           async_op: bool = False) -> Any:
    """Every rank's ``tensor`` concatenated, in rank order, into ``output_tensor``."""
    comm = _comm(group)
    if output_tensor.numel() != tensor.numel() * comm.world_size:
        raise ValueError(f"all_gather_into_tensor: the output has {output_tensor.numel()} elements, it needs "
                         f"{tensor.numel()} x {comm.world_size} ranks")
    out = comm.all_gather(tensor.contiguous().view(-1), out=output_tensor.view(-1), async_op=async_op)
    return out if async_op else None


def reduce_scatter_tensor(output_tensor: torch.Tensor, tensor: torch.Tensor, op: Any = ReduceOp.SUM,
                          group: Any = None, async_op: bool = False) -> Any:
    """Reduce ``tensor`` across ``group``; this rank's equal slice of the result goes into ``output_tensor``."""
    comm = _comm(group)
    if tensor.numel() != output_tensor.numel() * comm.world_size:
        raise ValueError(f"reduce_scatter_tensor: the input has {tensor.numel()} elements, it needs the "
                         f"output's {output_tensor.numel()} x {comm.world_size} ranks")
    out = comm.reduce_scatter(tensor.contiguous().view(-1), _op(op), out=output_tensor.view(-1),
                              async_op=async_op)
    return out if async_op else None


def broadcast(tensor: torch.Tensor, src: int, group: Any = None, async_op: bool = False) -> Any:
    """Copy ``tensor`` from global rank ``src`` to every rank of ``group``."""
    out = _comm(group).broadcast(tensor, _group_rank(group, src), async_op=async_op)
    return out if async_op else None


def all_gather_object(object_list: list[Any], obj: Any, group: Any = None) -> None:
    """Every rank's picklable ``obj`` into ``object_list`` (one slot per rank of ``group``)."""
    _comm(group)
    dist.all_gather_object(object_list, obj, group=group)


def broadcast_object_list(object_list: list[Any], src: int, group: Any = None, device: Any = None) -> None:
    """Replace ``object_list``'s picklable items, on every rank of ``group``, with global rank ``src``'s."""
    _comm(group)
    dist.broadcast_object_list(object_list, src, group=group, device=device)


def monitored_barrier(group: Any = None, timeout: Any = None, wait_all_ranks: bool = False) -> None:
    """A barrier that names the ranks that did not reach it within ``timeout`` (a ``timedelta``).
    torch implements it on Gloo only; on NCCL it raises."""
    _comm(group)
    dist.monitored_barrier(group=group, timeout=timeout, wait_all_ranks=wait_all_ranks)


def send(tensor: torch.Tensor, dst: int, group: Any = None, tag: int = 0) -> None:
    _no_tag(tag)
    _comm(group).send(tensor, _group_rank(group, dst))


def recv(tensor: torch.Tensor, src: int | None = None, group: Any = None, tag: int = 0) -> int:
    """Receive into ``tensor`` from global rank ``src`` (``None``: from any rank); returns the sender."""
    _no_tag(tag)
    if src is None:
        _comm(group)
        return dist.recv(tensor, None, group=group)
    _comm(group).recv(tensor, _group_rank(group, src))
    return src


def isend(tensor: torch.Tensor, dst: int, group: Any = None, tag: int = 0) -> Any:
    _no_tag(tag)
    return _comm(group).send(tensor, _group_rank(group, dst), async_op=True)


def irecv(tensor: torch.Tensor, src: int, group: Any = None, tag: int = 0) -> Any:
    _no_tag(tag)
    return _comm(group).recv(tensor, _group_rank(group, src), async_op=True)


def barrier(group: Any = None, async_op: bool = False, device_ids: Any = None) -> Any:
    del device_ids  # NCCL's device hint; the communicator's backend knows its device
    return _comm(group).barrier(async_op=async_op)


def _no_tag(tag: int) -> None:
    if tag != 0:
        raise ValueError(f"deepspeed.comm: message tags are not supported (got tag={tag}); NCCL ignores them too")
