"""Stage-to-stage messages: a small header, then the tensor, over a zero-comm communicator.

Every message is a fixed-size int64 header -- what it is, its micro-batch, the
virtual stage it is for, dtype and shape -- followed by the payload. The header
lets the receiver (1) allocate the right buffer without knowing shapes in advance,
(2) refuse a tensor whose shape or dtype differs from the one it expects with an
error that names both stages, instead of a garbled receive or a hang, and (3) take
messages in whatever order they arrive: one that comes before it is wanted is
stashed until its receive (schedules then only need to be deadlock-free, not to
match send and receive order, which is what ``simulate`` checks).

Sends are asynchronous and waited on at the end of the batch; receives block. The
interpreter posts the receive of a peer's next message ahead of time
(:meth:`Transport.prefetch`, before each forward or backward): every rank knows
every schedule, so it knows the order in which a peer will send, and with static
shapes (the default, as in DeepSpeed) it knows each message's size after the first
batch, so header and payload land while the stage computes. Gloo's sends wait for
the matching receive, so a receive posted only when needed costs a round trip of
thread wake-ups per message; posting ahead removes it from the critical path.
When a stage fails it sends an ``abort`` header to every other stage, and a stage
that receives one raises :class:`PipelineAborted` at once, so one rank's error
ends the whole pipeline in bounded time rather than at the process-group timeout.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from zero_comm import P2P, CommError, Communicator

__all__ = ["MessageKey", "PipelineAborted", "PipelineError", "Transport"]

MessageKey = tuple[str, int, int]  # (kind, micro_batch or index, virtual stage or rank)

_KINDS = ("act", "grad", "tied", "tied_init", "abort")
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
           torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128)
MAX_DIMS = 8
_HEADER = 5 + MAX_DIMS  # kind, index, target, dtype, ndim, dims


class PipelineError(RuntimeError):
    """A pipeline stage could not go on: names the stage, the micro-batch and what was wrong."""


class PipelineAborted(PipelineError, CommError):
    """Another stage failed and told this one to stop; that stage's error is the one to read.

    It is also a :class:`zero_comm.CommError`, so harnesses that rank failures (``run_ranks``)
    report the stage that failed first as the cause."""


def spec(tensor: torch.Tensor) -> str:
    return _spec(tensor.shape, tensor.dtype)


def _spec(shape: torch.Size, dtype: torch.dtype) -> str:
    return f"{str(dtype).removeprefix('torch.')}{list(shape)}"


@dataclass
class _Posted:
    """A message whose receive was posted ahead: its header, and its payload once its size is known."""

    key: MessageKey
    header: torch.Tensor
    header_handle: Any
    payload: torch.Tensor | None
    payload_handle: Any


class Transport:
    """Header-framed, stash-on-arrival point-to-point messages between pipeline stages.

    Args:
        static_shapes: the first message of each kind into each virtual stage fixes
            its shape and dtype; a later one that differs is refused by its *sender*
            (naming both stages), and receives can be posted, payload included,
            before the message is sent.
    """

    def __init__(self, comm: Communicator, *, static_shapes: bool = True):
        self.comm = comm
        self.static_shapes = static_shapes
        self._stash: dict[tuple[int, MessageKey], torch.Tensor] = {}
        self._pending: list[tuple[Any, torch.Tensor, torch.Tensor]] = []
        self._posted: dict[int, _Posted] = {}
        self._incoming: dict[int, deque[MessageKey]] = {}  # src -> act/grad messages still to come, in order
        self._shapes: dict[tuple[str, int, int], tuple[torch.Size, torch.dtype]] = {}  # (kind, peer, target)

    def expect(self, incoming: dict[int, list[MessageKey]]) -> None:
        """The activation and gradient messages each peer will send this batch, in its sending order."""
        if self._posted:
            raise PipelineError(f"stage {self.comm.rank} starts a batch with receives still posted from "
                                f"stages {sorted(self._posted)}")
        self._incoming = {src: deque(keys) for src, keys in incoming.items()}

    def prefetch(self, src: int) -> None:
        """Post the receive of the next message from ``src`` now, so it lands while this stage computes.

        The header is always posted; the payload too once static shapes know its size.
        """
        queue = self._incoming.get(src)
        if src in self._posted or not queue:
            return
        key = queue.popleft()
        header = torch.empty(_HEADER, dtype=torch.int64)
        header_handle = self.comm.recv(header, src, async_op=True)
        known = self._shapes.get((key[0], src, key[2])) if self.static_shapes else None
        payload = torch.empty(known[0], dtype=known[1]) if known is not None else None
        payload_handle = self.comm.recv(payload, src, async_op=True) if payload is not None else None
        self._posted[src] = _Posted(key, header, header_handle, payload, payload_handle)

    def send(self, key: MessageKey, tensor: torch.Tensor, dst: int) -> None:
        if tensor.dtype not in _DTYPES:
            raise PipelineError(f"stage {self.comm.rank} cannot send a {tensor.dtype} tensor to stage {dst}")
        if tensor.dim() > MAX_DIMS:
            raise PipelineError(f"stage {self.comm.rank} cannot send a {tensor.dim()}-d tensor to stage {dst} "
                                f"(at most {MAX_DIMS} dimensions)")
        payload = tensor.detach().contiguous()
        if self.static_shapes and key[0] in ("act", "grad"):
            fixed = self._shapes.setdefault((key[0], dst, key[2]), (payload.shape, payload.dtype))
            if fixed != (payload.shape, payload.dtype):
                what = "activation" if key[0] == "act" else "gradient"
                raise PipelineError(
                    f"stage {self.comm.rank} would send stage {dst} the {what} of micro-batch {key[1]} as "
                    f"{spec(payload)}, but the first batch fixed it as {_spec(*fixed)}; pipeline shapes are static "
                    "(give every batch the same shapes, or build the engine with dynamic_shapes=True)")
        header = torch.zeros(_HEADER, dtype=torch.int64)
        header[:5] = torch.tensor([_KINDS.index(key[0]), key[1], key[2], _DTYPES.index(payload.dtype),
                                   payload.dim()])
        header[5:5 + payload.dim()] = torch.tensor(payload.shape, dtype=torch.int64)
        handle = self.comm.batch_p2p([P2P("send", header, dst), P2P("send", payload, dst)])
        self._pending = [p for p in self._pending if not p[0].is_completed()]
        self._pending.append((handle, header, payload))

    def recv(self, key: MessageKey, src: int, *, what: str,
             expect: tuple[torch.Size, torch.dtype] | None = None) -> torch.Tensor:
        """Receive the message ``key`` from ``src``; ``what`` says in errors what it is for."""
        tensor = self._stash.pop((src, key), None)
        while tensor is None:
            got_key, got = self._recv_one(src)
            if got_key == key:
                tensor = got
            else:
                self._stash[(src, got_key)] = got
        if expect is not None and (tensor.shape != expect[0] or tensor.dtype != expect[1]):
            want = _spec(*expect)
            raise PipelineError(f"stage {self.comm.rank} expected {what} from stage {src} as {want} but received "
                                f"{spec(tensor)}")
        return tensor

    def _recv_one(self, src: int) -> tuple[MessageKey, torch.Tensor]:
        posted = self._posted.pop(src, None)
        if posted is not None:
            posted.header_handle.wait()
            header = posted.header
        else:
            header = torch.empty(_HEADER, dtype=torch.int64)
            self.comm.recv(header, src)
        kind, index, target, dtype, ndim = (int(v) for v in header[:5])
        if not 0 <= kind < len(_KINDS) or not 0 <= dtype < len(_DTYPES) or not 0 <= ndim <= MAX_DIMS:
            raise PipelineError(f"stage {self.comm.rank} received a malformed header from stage {src}: "
                                f"{header.tolist()} (do all stages run the same zero-pipe version and schedule?)")
        if _KINDS[kind] == "abort":
            raise PipelineAborted(f"stage {src} failed and aborted the pipeline; read its error")
        key, shape = (_KINDS[kind], index, target), torch.Size(int(d) for d in header[5:5 + ndim])
        if posted is None and key[0] in ("act", "grad") and self._incoming.get(src):
            self._incoming[src].popleft()  # taken without prefetch: keep the expected order in step
        if posted is not None and posted.payload is not None:
            if (key, shape, _DTYPES[dtype]) != (posted.key, posted.payload.shape, posted.payload.dtype):
                raise PipelineError(f"stage {self.comm.rank} posted a receive for {posted.key} as "
                                    f"{spec(posted.payload)} but stage {src} sent {key} as "
                                    f"{_spec(shape, _DTYPES[dtype])} (do all stages run the same schedule?)")
            assert posted.payload_handle is not None
            posted.payload_handle.wait()
            payload = posted.payload
        else:
            payload = torch.empty(shape, dtype=_DTYPES[dtype])
            self.comm.recv(payload, src)
        if self.static_shapes and key[0] in ("act", "grad"):
            self._shapes.setdefault((key[0], src, key[2]), (payload.shape, payload.dtype))
        return key, payload

    def flush(self) -> None:
        """Wait until every message sent so far has been received."""
        for handle, _, _ in self._pending:
            handle.wait()
        self._pending.clear()

    def abort(self, peers: list[int], wait_s: float = 2.0) -> None:
        """Tell ``peers`` this stage failed; best effort, waits at most ``wait_s`` for them to take it."""
        handles = []
        for peer in peers:
            header = torch.zeros(_HEADER, dtype=torch.int64)
            header[0] = _KINDS.index("abort")
            try:
                handles.append((self.comm.send(header, peer, async_op=True), header))
            except RuntimeError:
                continue
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and not all(h.is_completed() for h, _ in handles):
            time.sleep(0.01)
        self._stash.clear()
