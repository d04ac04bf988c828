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
interpreter may post the next header's receive from a peer ahead of time
(:meth:`Transport.prefetch`, before a forward or backward), so the header's latency
hides behind compute and only the payload's is paid when the receive comes; it
does so only while the schedule still expects messages from that peer, so no
receive is left posted when a batch ends.
When a stage fails it sends an ``abort`` header to every other stage, and a stage
that receives one raises :class:`PipelineAborted` at once, so one rank's error
ends the whole pipeline in bounded time rather than at the process-group timeout.
"""

from __future__ import annotations

import time
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
    return f"{str(tensor.dtype).removeprefix('torch.')}{list(tensor.shape)}"


class Transport:
    """Header-framed, stash-on-arrival point-to-point messages between pipeline stages."""

    def __init__(self, comm: Communicator):
        self.comm = comm
        self._stash: dict[tuple[int, MessageKey], torch.Tensor] = {}
        self._pending: list[tuple[Any, torch.Tensor, torch.Tensor]] = []
        self._posted: dict[int, tuple[Any, torch.Tensor]] = {}  # src -> (handle, header buffer)
        self._expected: dict[int, int] = {}  # src -> messages still to come this batch

    def expect(self, counts: dict[int, int]) -> None:
        """How many messages each peer will send this batch; bounds :meth:`prefetch`."""
        self._expected = dict(counts)

    def prefetch(self, src: int) -> None:
        """Post the receive of the next header from ``src`` now, if one is still to come and none is posted."""
        if src not in self._posted and self._expected.get(src, 0) > 0:
            header = torch.empty(_HEADER, dtype=torch.int64)
            self._posted[src] = (self.comm.recv(header, src, async_op=True), header)

    def send(self, key: MessageKey, tensor: torch.Tensor, dst: int) -> None:
        if tensor.dtype not in _DTYPES:
            raise PipelineError(f"stage {self.comm.rank} cannot send a {tensor.dtype} tensor to stage {dst}")
        if tensor.dim() > MAX_DIMS:
            raise PipelineError(f"stage {self.comm.rank} cannot send a {tensor.dim()}-d tensor to stage {dst} "
                                f"(at most {MAX_DIMS} dimensions)")
        payload = tensor.detach().contiguous()
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
            want = f"{str(expect[1]).removeprefix('torch.')}{list(expect[0])}"
            raise PipelineError(f"stage {self.comm.rank} expected {what} from stage {src} as {want} but received "
                                f"{spec(tensor)}")
        return tensor

    def _recv_one(self, src: int) -> tuple[MessageKey, torch.Tensor]:
        posted = self._posted.pop(src, None)
        if posted is not None:
            posted[0].wait()
            header = posted[1]
        else:
            header = torch.empty(_HEADER, dtype=torch.int64)
            self.comm.recv(header, src)
        self._expected[src] = self._expected.get(src, 0) - 1
        kind, index, target, dtype, ndim = (int(v) for v in header[:5])
        if not 0 <= kind < len(_KINDS) or not 0 <= dtype < len(_DTYPES) or not 0 <= ndim <= MAX_DIMS:
            raise PipelineError(f"stage {self.comm.rank} received a malformed header from stage {src}: "
                                f"{header.tolist()} (do all stages run the same zero-pipe version and schedule?)")
        if _KINDS[kind] == "abort":
            raise PipelineAborted(f"stage {src} failed and aborted the pipeline; read its error")
        payload = torch.empty([int(d) for d in header[5:5 + ndim]], dtype=_DTYPES[dtype])
        self.comm.recv(payload, src)
        return (_KINDS[kind], index, target), payload

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
