"""The communicator: the collectives the rest of zero needs, over one process group.

Every call works on flat tensors, can run asynchronously (``async_op=True`` returns
a :class:`Handle` whose ``wait()`` gives the result), and is booked in a
:class:`~zero_comm.CommLedger`. Sizes that do not divide the world size are padded
on the way in and trimmed on the way out, so callers think in logical sizes.

Shards follow one rule everywhere (:func:`shard_range`): a flat tensor of ``numel``
elements is cut into ``world_size`` chunks of ``ceil(numel / world_size)``
elements; rank ``r`` owns ``[r * chunk, min((r + 1) * chunk, numel))``, which can
be shorter than a chunk, or empty, on the last ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar, runtime_checkable

import torch
import torch.distributed as dist

from ._ledger import CommLedger, default_ledger

__all__ = [
    "P2P",
    "CommError",
    "Communicator",
    "Handle",
    "ProcessGroupCommunicator",
    "ReduceOp",
    "shard_range",
]

T = TypeVar("T")
ReduceOp = Literal["sum", "avg", "max", "min", "product"]

_TORCH_OPS = {
    "sum": dist.ReduceOp.SUM,
    "max": dist.ReduceOp.MAX,
    "min": dist.ReduceOp.MIN,
    "product": dist.ReduceOp.PRODUCT,
}

# torch 2.13 renamed the flat collectives; torch 2.11 only has the old names.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class CommError(RuntimeError):
    """A collective failed: names the operation, the group and this rank.

    The usual cause is a peer rank that raised, died or was killed; its own error
    is the one to read.
    """


def shard_range(numel: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, stop)`` of the slice of a flat tensor of ``numel`` elements owned by ``rank``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of size {world_size}")
    chunk = math.ceil(numel / world_size) if numel else 0
    start = min(rank * chunk, numel)
    return start, min(start + chunk, numel)


class Handle(Generic[T]):
    """An in-flight collective. ``wait()`` blocks until it is done and returns its result.

    Waiting twice is harmless; the second call returns the same result.
    """

    def __init__(self, works: Sequence[Any], finish: Callable[[], T], describe: Callable[[], str]):
        self._works = [w for w in works if w is not None]
        self._finish = finish
        self._describe = describe
        self._done = False
        self._result: T | None = None

    def is_completed(self) -> bool:
        return self._done or all(w.is_completed() for w in self._works)

    def wait(self) -> T:
        if not self._done:
            try:
                for work in self._works:
                    work.wait()
            except CommError:
                raise
            except (RuntimeError, dist.DistError) as exc:
                raise CommError(f"{self._describe()} failed: {exc}") from exc
            self._result = self._finish()
            self._done = True
        return self._result  # type: ignore[return-value]


@dataclass(frozen=True)
class P2P:
    """One point-to-point operation for :meth:`Communicator.batch_p2p`.

    ``peer`` is a rank of the communicator's group.
    """

    kind: Literal["send", "recv"]
    tensor: torch.Tensor
    peer: int


@runtime_checkable
class Communicator(Protocol):
    """What zero's packages need from a group of ranks. See :class:`ProcessGroupCommunicator`."""

    @property
    def rank(self) -> int: ...
    @property
    def world_size(self) -> int: ...
    @property
    def name(self) -> str: ...
    @property
    def ledger(self) -> CommLedger: ...

    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp = "sum", *, async_op: bool = False) -> Any: ...
    def reduce_scatter(self, flat: torch.Tensor, op: ReduceOp = "sum", *, out: torch.Tensor | None = None,
                       async_op: bool = False, consume_input: bool = False) -> Any: ...
    def all_gather(self, shard: torch.Tensor, numel: int | None = None, *, out: torch.Tensor | None = None,
                   async_op: bool = False) -> Any: ...
    def broadcast(self, tensor: torch.Tensor, src: int, *, async_op: bool = False) -> Any: ...
    def all_to_all(self, tensor: torch.Tensor, *, out: torch.Tensor | None = None, async_op: bool = False) -> Any: ...
    def send(self, tensor: torch.Tensor, dst: int, *, async_op: bool = False) -> Any: ...
    def recv(self, tensor: torch.Tensor, src: int, *, async_op: bool = False) -> Any: ...
    def batch_p2p(self, ops: Sequence[P2P]) -> Handle[None]: ...
    def barrier(self, *, async_op: bool = False) -> Any: ...


def _flat_view(tensor: torch.Tensor, what: str) -> torch.Tensor:
    if tensor.dim() == 1 and tensor.is_contiguous():
        return tensor  # already flat: creating a view costs a microsecond on every call
    if not tensor.is_contiguous():
        raise ValueError(f"{what} needs a contiguous tensor; got strides {tuple(tensor.stride())} "
                         f"for shape {tuple(tensor.shape)} (call .contiguous() first)")
    return tensor.view(-1)


class ProcessGroupCommunicator:
    """A :class:`Communicator` over one ``torch.distributed`` process group.

    Args:
        group: the process group; ``None`` is the default (world) group.
        name: how the group is named in the ledger and in errors ("world", "dp", ...).
        ledger: where calls are booked; default: the world's :func:`default_ledger`,
            shared by every communicator that is not given its own, so a whole
            step's traffic on every group is read in one place.

    Results are the same on Gloo and NCCL: ``avg`` is computed as a sum followed by
    one division on every backend, and where a backend lacks a flat
    reduce_scatter or all_gather (older Gloo) the communicator falls back to
    all_reduce-then-slice or a list all_gather. The ledger books the logical
    collective in either case, and :attr:`fallbacks` says which ones were used.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, *, name: str = "world",
                 ledger: CommLedger | None = None):
        if not dist.is_initialized():
            raise CommError("torch.distributed is not initialised; call zero_comm.init_distributed() first")
        self._group = group
        self._name = name
        self._ledger = ledger if ledger is not None else default_ledger()
        self._rank = dist.get_rank(group)
        self._world_size = dist.get_world_size(group)
        if self._rank < 0:
            raise CommError(f"this process (global rank {dist.get_rank()}) is not a member of group '{name}'")
        self.fallbacks: set[str] = set()
        # Gloo's reduce-scatter is slower than even its all-reduce of the whole buffer; an all-to-all of
        # the blocks and a local sum moves the reduce-scatter's own (n-1)/n bytes in one call and beats
        # both (2 ranks, 7 MiB: 11.4 ms against all-reduce 14.9 and reduce-scatter 24.7; 4 ranks: 14.8
        # against 35.6 and 47.7), so sums and averages run that way there.
        self.reduce_by_all_to_all = self.backend == "gloo"

    # -- identity -----------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def name(self) -> str:
        return self._name

    @property
    def ledger(self) -> CommLedger:
        return self._ledger

    @property
    def group(self) -> dist.ProcessGroup | None:
        return self._group

    @property
    def backend(self) -> str:
        return str(dist.get_backend(self._group))

    def global_rank(self, group_rank: int) -> int:
        """The world rank of ``group_rank`` in this communicator's group."""
        if self._group is None:
            return group_rank
        return dist.get_global_rank(self._group, group_rank)

    def __repr__(self) -> str:
        return f"ProcessGroupCommunicator(name={self._name!r}, rank={self._rank}, world_size={self._world_size})"

    # -- helpers --------------------------------------------------------------------
    def _describe(self, kind: str, tensor: torch.Tensor) -> Callable[[], str]:
        return lambda: (f"{kind} of {tensor.numel()} x {tensor.dtype} on group '{self._name}' "
                        f"(rank {self._rank} of {self._world_size}, backend {self.backend}); "
                        "a peer rank has probably raised, exited or been killed -- read its error")

    def _issue(self, kind: str, tensor: torch.Tensor, payload_bytes: int, launch: Callable[[bool], Any],
               finish: Callable[[], T], async_op: bool) -> Handle[T] | T:
        self._ledger.book(kind, self._name, payload_bytes, self._world_size)
        try:
            works = launch(async_op)
            if not async_op:  # the common case, kept lean: torch's blocking call, no handle
                return finish()
        except (RuntimeError, dist.DistError) as exc:
            raise CommError(f"{self._describe(kind, tensor)()} failed: {exc}") from exc
        return Handle(works if isinstance(works, list) else [works], finish, self._describe(kind, tensor))

    def _even_call(self, kind: str, tensor: torch.Tensor, call: Callable[[], Any], payload_bytes: int) -> bool:
        """Run a blocking, evenly sized collective; False if the backend lacks it (use the general path)."""
        try:
            call()
        except (RuntimeError, NotImplementedError) as exc:
            if _unsupported(exc):
                self.fallbacks.add(kind)
                return False
            raise CommError(f"{self._describe(kind, tensor)()} failed: {exc}") from exc
        self._ledger.book(kind, self._name, payload_bytes, self._world_size)
        return True

    # -- collectives ----------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp = "sum", *,
                   async_op: bool = False) -> Handle[torch.Tensor] | torch.Tensor:
        """Reduce ``tensor`` in place across the group; returns it (or a handle)."""
        flat = _flat_view(tensor, "all_reduce")
        torch_op = _reduce_op(op, tensor.dtype)
        if not async_op:  # the hot path: torch's blocking call and nothing else
            try:
                dist.all_reduce(flat, torch_op, group=self._group)
            except (RuntimeError, dist.DistError) as exc:
                raise CommError(f"{self._describe('all_reduce', flat)()} failed: {exc}") from exc
            self._ledger.book("all_reduce", self._name, _nbytes(flat), self._world_size)
            return tensor.div_(self._world_size) if op == "avg" else tensor

        def finish() -> torch.Tensor:
            if op == "avg":
                flat.div_(self._world_size)
            return tensor

        return self._issue("all_reduce", flat, _nbytes(flat),
                           lambda a: dist.all_reduce(flat, torch_op, group=self._group, async_op=a),
                           finish, async_op)

    def reduce_scatter(self, flat: torch.Tensor, op: ReduceOp = "sum", *, out: torch.Tensor | None = None,
                       async_op: bool = False, consume_input: bool = False) -> Handle[torch.Tensor] | torch.Tensor:
        """Reduce ``flat`` across the group and return this rank's shard of the result.

        The shard is ``flat[shard_range(numel, rank, world_size)]`` of the reduced
        tensor. ``out``, if given, must hold ``ceil(numel / world_size)`` elements;
        the returned shard is a view of it. ``flat`` is never modified. On a backend
        whose reduce-scatter is slow (Gloo: :attr:`reduce_by_all_to_all`), a sum or an
        average is an all-to-all of the ``world_size`` blocks and a local sum of the
        blocks received. The ledger books a reduce-scatter either way: it records what
        the algorithm asks for. ``consume_input`` is the caller's promise not to read
        ``flat`` again; no path needs it today, and callers may keep giving it.
        """
        del consume_input
        n = self._world_size
        exchange = self.reduce_by_all_to_all and op in ("sum", "avg") and flat.is_floating_point()
        if (not async_op and not exchange and op in ("sum", "avg") and out is not None
                and out.numel() * n == flat.numel()
                and out.dim() == 1 and flat.dim() == 1 and out.dtype == flat.dtype and flat.is_floating_point()
                and out.is_contiguous() and flat.is_contiguous() and "reduce_scatter" not in self.fallbacks
                and self._even_call("reduce_scatter", flat,
                                    lambda: _reduce_scatter_flat(out, flat, dist.ReduceOp.SUM, group=self._group),
                                    flat.numel() * flat.element_size())):
            return out.div_(n) if op == "avg" else out  # the hot path: see all_gather
        data = _flat_view(flat, "reduce_scatter")
        torch_op = _reduce_op(op, data.dtype)
        n, numel = self._world_size, data.numel()
        chunk = math.ceil(numel / n) if numel else 0
        padded = _pad(data, chunk * n)
        shard = _check_out(out, chunk, data, "reduce_scatter")
        start, stop = shard_range(numel, self._rank, n)
        native = "reduce_scatter" not in self.fallbacks and not exchange
        reduced = padded

        def launch(async_op: bool) -> Any:
            nonlocal native, reduced
            if exchange:  # row i of what lands here is rank i's block for this rank: their sum is the shard
                reduced = torch.empty_like(padded)
                return dist.all_to_all_single(reduced, padded, group=self._group, async_op=async_op)
            if native:
                try:
                    return _reduce_scatter_flat(shard, padded, torch_op, group=self._group, async_op=async_op)
                except (RuntimeError, NotImplementedError) as exc:
                    if not _unsupported(exc):
                        raise
                    self.fallbacks.add("reduce_scatter")
                    native = False
            reduced = padded.clone() if padded is data else padded  # never reduce the caller's input
            return dist.all_reduce(reduced, torch_op, group=self._group, async_op=async_op)

        def finish() -> torch.Tensor:
            if exchange:
                with torch.no_grad():  # a collective's result is data: `out` may be a tensor that requires grad
                    torch.sum(reduced.view(n, chunk), 0, out=shard)
                # Gloo's finished work keeps its output referenced until its worker thread next runs: free the
                # blocks now, or each reduction's would stay alive that long beside the next ones
                reduced.untyped_storage().resize_(0)
            elif not native:
                shard.copy_(reduced[self._rank * chunk:(self._rank + 1) * chunk])
            if op == "avg":
                shard.div_(n)
            return shard if stop - start == chunk else shard[: stop - start]

        return self._issue("reduce_scatter", data, _nbytes(padded), launch, finish, async_op)

    def all_gather(self, shard: torch.Tensor, numel: int | None = None, *, out: torch.Tensor | None = None,
                   async_op: bool = False) -> Handle[torch.Tensor] | torch.Tensor:
        """Gather every rank's shard into one flat tensor of ``numel`` elements.

        With ``numel`` given, shards follow :func:`shard_range` (so they may differ
        in size); without it every shard has this rank's size. ``out``, if given,
        must hold ``ceil(numel / world_size) * world_size`` elements; the returned
        tensor is a view of it.
        """
        n = self._world_size
        # The hot path of bucketed training (even sizes, the caller's buffer, blocking): no padding,
        # no handle, nothing allocated; a backend that lacks the op falls through to the general path.
        if (not async_op and out is not None and out.numel() == shard.numel() * n and numel in (None, out.numel())
                and out.dim() == 1 and shard.dim() == 1 and out.dtype == shard.dtype
                and out.is_contiguous() and shard.is_contiguous() and "all_gather" not in self.fallbacks
                and self._even_call("all_gather", shard, lambda: _all_gather_flat(out, shard, group=self._group),
                                    out.numel() * out.element_size())):
            return out
        data = _flat_view(shard, "all_gather")
        if numel is None:
            numel = data.numel() * n
        start, stop = shard_range(numel, self._rank, n)
        if data.numel() != stop - start:
            raise ValueError(f"all_gather on group '{self._name}': rank {self._rank} owns elements "
                             f"[{start}, {stop}) of {numel} but was given a shard of {data.numel()}")
        chunk = math.ceil(numel / n) if numel else 0
        padded_shard = _pad(data, chunk)
        full = _check_out(out, chunk * n, data, "all_gather")
        native = "all_gather" not in self.fallbacks

        def launch(async_op: bool) -> Any:
            nonlocal native
            if native:
                try:
                    return _all_gather_flat(full, padded_shard, group=self._group, async_op=async_op)
                except (RuntimeError, NotImplementedError) as exc:
                    if not _unsupported(exc):
                        raise
                    self.fallbacks.add("all_gather")
                    native = False
            return dist.all_gather(list(full.chunk(n)) if chunk else [full] * n, padded_shard,
                                   group=self._group, async_op=async_op)

        return self._issue("all_gather", data, chunk * n * data.element_size(), launch,
                           (lambda: full) if numel == chunk * n else (lambda: full[:numel]), async_op)

    def broadcast(self, tensor: torch.Tensor, src: int, *,
                  async_op: bool = False) -> Handle[torch.Tensor] | torch.Tensor:
        """Copy ``tensor`` from group rank ``src`` to every rank, in place."""
        self._check_peer(src, "broadcast source")
        return self._issue("broadcast", tensor, _nbytes(tensor),
                           lambda a: dist.broadcast(tensor, self.global_rank(src), group=self._group,
                                                   async_op=a),
                           lambda: tensor, async_op)

    def all_to_all(self, tensor: torch.Tensor, *, out: torch.Tensor | None = None,
                   async_op: bool = False) -> Handle[torch.Tensor] | torch.Tensor:
        """Cut ``tensor``'s first dimension into ``world_size`` equal blocks and send block ``i`` to rank
        ``i``; the result holds, at block ``i``, what rank ``i`` sent here (same shape as ``tensor``).

        The exchange is its own inverse, so the gradient of an all-to-all is the all-to-all of the
        gradient (expert and sequence parallelism use it both ways).
        """
        n = self._world_size
        if tensor.dim() == 0 or tensor.shape[0] % n:
            raise ValueError(f"all_to_all on group '{self._name}': the first dimension "
                             f"({tuple(tensor.shape)[:1] or 'a scalar'}) must divide into {n} equal blocks")
        data = tensor.contiguous()
        result = torch.empty_like(data) if out is None else out
        if result.shape != data.shape or result.dtype != data.dtype or not result.is_contiguous():
            raise ValueError(f"all_to_all: out must be a contiguous {data.dtype} tensor of shape "
                             f"{tuple(data.shape)}; got {result.dtype} {tuple(result.shape)}")
        return self._issue("all_to_all", data, _nbytes(data),
                           lambda a: dist.all_to_all_single(result, data, group=self._group, async_op=a),
                           lambda: result, async_op)

    def send(self, tensor: torch.Tensor, dst: int, *, async_op: bool = False) -> Handle[None] | None:
        """Send ``tensor`` to group rank ``dst``."""
        self._check_peer(dst, "send destination")
        return self._issue("send", tensor, _nbytes(tensor),
                           lambda a: _p2p(dist.isend, dist.send, a, tensor, self.global_rank(dst), self._group),
                           lambda: None, async_op)

    def recv(self, tensor: torch.Tensor, src: int, *, async_op: bool = False) -> Handle[torch.Tensor] | torch.Tensor:
        """Receive into ``tensor`` from group rank ``src``."""
        self._check_peer(src, "recv source")
        return self._issue("recv", tensor, _nbytes(tensor),
                           lambda a: _p2p(dist.irecv, dist.recv, a, tensor, self.global_rank(src), self._group),
                           lambda: tensor, async_op)

    def batch_p2p(self, ops: Sequence[P2P]) -> Handle[None]:
        """Issue several sends and receives together (one NCCL group call); wait on the handle."""
        if not ops:
            return Handle([], lambda: None, lambda: "empty batch_p2p")
        torch_ops = []
        for p in ops:
            if p.kind not in ("send", "recv"):
                raise ValueError(f"P2P kind must be 'send' or 'recv', got {p.kind!r}")
            self._check_peer(p.peer, f"{p.kind} peer")
            self._ledger.book(p.kind, self._name, _nbytes(p.tensor), self._world_size)
            fn = dist.isend if p.kind == "send" else dist.irecv
            torch_ops.append(dist.P2POp(fn, p.tensor, self.global_rank(p.peer), group=self._group))
        describe = self._describe("batch_p2p", ops[0].tensor)
        try:
            works = dist.batch_isend_irecv(torch_ops)
        except (RuntimeError, dist.DistError) as exc:
            raise CommError(f"{describe()} failed: {exc}") from exc
        return Handle(works, lambda: None, describe)

    def barrier(self, *, async_op: bool = False) -> Handle[None] | None:
        """Block until every rank of the group reaches this point (or return a handle that does)."""
        return self._issue("barrier", torch.empty(0), 0,
                           lambda a: dist.barrier(group=self._group, async_op=a), lambda: None, async_op)

    def _check_peer(self, peer: int, what: str) -> None:
        if not 0 <= peer < self._world_size:
            raise ValueError(f"{what} {peer} is outside group '{self._name}' of size {self._world_size}")


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _reduce_op(op: str, dtype: torch.dtype) -> Any:
    if op == "avg":
        if not (dtype.is_floating_point or dtype.is_complex):
            raise ValueError(f"reduce op 'avg' needs a floating-point tensor, got {dtype}")
        return dist.ReduceOp.SUM
    try:
        return _TORCH_OPS[op]
    except KeyError:
        raise ValueError(f"unknown reduce op {op!r}; expected one of sum, avg, max, min, product") from None


def _p2p(async_fn: Callable, sync_fn: Callable, async_op: bool, tensor: torch.Tensor, peer: int,
         group: dist.ProcessGroup | None) -> Any:
    return async_fn(tensor, peer, group=group) if async_op else sync_fn(tensor, peer, group=group)


def _pad(flat: torch.Tensor, numel: int) -> torch.Tensor:
    if flat.numel() == numel:
        return flat
    padded = flat.new_zeros(numel)
    padded[: flat.numel()].copy_(flat)
    return padded


def _check_out(out: torch.Tensor | None, numel: int, like: torch.Tensor, kind: str) -> torch.Tensor:
    if out is None:
        return like.new_empty(numel)
    if out.numel() != numel or out.dtype != like.dtype or out.device != like.device or not out.is_contiguous():
        raise ValueError(f"{kind}: out must be a contiguous {like.dtype} tensor of {numel} elements on "
                         f"{like.device}; got {out.numel()} x {out.dtype} on {out.device}")
    return out if out.dim() == 1 else out.view(-1)


def _unsupported(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "not supported" in text or "unsupported" in text or "does not support" in text

