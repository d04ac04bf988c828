"""Stage-to-stage messages over a zero-comm communicator: framed, checked, posted ahead, abortable.

Every message carries a header (see ``_framing``) that lets the receiver (1)
allocate the right buffer without knowing shapes in advance, (2) refuse a message
other than the one it expects with an error naming both stages, instead of a
garbled receive or a hang, and (3) take messages in whatever order they arrive:
one that comes before it is wanted is stashed until its receive (schedules then
need only be deadlock-free, which ``simulate`` checks).

Sends are asynchronous and waited on at the end of the batch. Receives are posted
ahead (:meth:`Transport.prefetch`, before each forward or backward): every rank
knows every schedule, hence the order in which a peer will send to it, and with
static shapes (the default, as in DeepSpeed) the first message of each kind fixes
the size of the later ones, which then travel packed, header and payload in one
transfer, into a buffer posted while the stage computes. Gloo's sends wait for the
matching receive, so a receive posted only when needed costs a round trip of
thread wake-ups per message.

When a stage fails it sends an ``abort`` header to every other stage (padded to the
size of the message that peer expects from it next), and a stage that receives one
raises :class:`PipelineAborted` and passes it on, so one rank's error ends the whole
pipeline in bounded time rather than at the process-group timeout.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from zero_comm import P2P, Communicator

from ._errors import PipelineAborted, PipelineError
from ._framing import HEADER_INTS, MessageKey, check_sendable, decode, encode, pack, packed_bytes, unpack

__all__ = ["MessageKey", "Transport", "spec"]

Shape = tuple[torch.Size, torch.dtype]


def spec(tensor: torch.Tensor) -> str:
    return _spec(tensor.shape, tensor.dtype)


def _spec(shape: torch.Size, dtype: torch.dtype) -> str:
    return f"{str(dtype).removeprefix('torch.')}{list(shape)}"


@dataclass
class _Posted:
    """A receive posted ahead: for ``key``, into ``buffer`` (packed) or a header buffer (split)."""

    key: MessageKey
    buffer: torch.Tensor
    handle: Any
    packed: Shape | None  # the payload's shape and dtype if the message comes packed


class Transport:
    """Header-framed, stash-on-arrival point-to-point messages between pipeline stages.

    Args:
        static_shapes: the first activation or gradient of each kind between two
            stages fixes the shape and dtype of the later ones; one that differs is
            refused by its *sender* (naming both stages), and the later ones travel
            packed into receives posted ahead.
    """

    def __init__(self, comm: Communicator, *, static_shapes: bool = True):
        self.comm = comm
        self.static_shapes = static_shapes
        self._stash: dict[tuple[int, MessageKey], torch.Tensor] = {}
        self._pending: list[tuple[Any, list[torch.Tensor]]] = []
        self._posted: dict[int, _Posted] = {}
        self._incoming: dict[int, deque[MessageKey]] = {}  # src -> act/grad messages still to come, in order
        self._outgoing: dict[int, deque[MessageKey]] = {}  # dst -> act/grad messages still to send, in order
        self._sent: dict[tuple[str, int, int], Shape] = {}  # (kind, dst, target) -> fixed shape
        self._received: dict[tuple[str, int, int], Shape] = {}  # (kind, src, target) -> fixed shape

    def expect(self, incoming: dict[int, list[MessageKey]], outgoing: dict[int, list[MessageKey]]) -> None:
        """The activation and gradient messages of this batch, per peer, in sending order."""
        if self._posted:
            raise PipelineError(f"stage {self.comm.rank} starts a batch with receives still posted from "
                                f"stages {sorted(self._posted)}")
        self._incoming = {src: deque(keys) for src, keys in incoming.items()}
        self._outgoing = {dst: deque(keys) for dst, keys in outgoing.items()}

    # -- sending ---------------------------------------------------------------------------------
    def send(self, key: MessageKey, tensor: torch.Tensor, dst: int) -> None:
        check_sendable(tensor, self.comm.rank, dst)
        payload = tensor.detach().contiguous()
        header = encode(key, payload.dtype, payload.shape)
        fixed = None
        if key[0] in ("act", "grad"):
            if self.static_shapes:
                fixed = self._sent.get((key[0], dst, key[2]))
                if fixed is None:
                    self._sent[(key[0], dst, key[2])] = (payload.shape, payload.dtype)
                elif fixed != (payload.shape, payload.dtype):
                    what = "activation" if key[0] == "act" else "gradient"
                    raise PipelineError(
                        f"stage {self.comm.rank} would send stage {dst} the {what} of micro-batch {key[1]} as "
                        f"{spec(payload)}, but the first batch fixed it as {_spec(*fixed)}; pipeline shapes are "
                        "static (give every batch the same shapes, or build the engine with dynamic_shapes=True)")
            queue = self._outgoing.get(dst)
            if queue and queue[0] == key:
                queue.popleft()  # only once it is sure to be sent: an abort is sized for the next one
        buffers = [pack(header, payload)] if fixed is not None else [header, payload]
        handle = self.comm.batch_p2p([P2P("send", b, dst) for b in buffers])
        self._pending = [p for p in self._pending if not p[0].is_completed()]
        self._pending.append((handle, buffers))

    # -- receiving -------------------------------------------------------------------------------
    def prefetch(self, src: int) -> None:
        """Post the receive of the next message from ``src`` now, so it lands while this stage computes."""
        if src not in self._posted and self._incoming.get(src):
            self._posted[src] = self._post(src)

    def _post(self, src: int) -> _Posted:
        """Post the receive of the next act/grad message from ``src`` (packed if its size is known)."""
        key = self._incoming[src].popleft()
        fixed = self._received.get((key[0], src, key[2])) if self.static_shapes else None
        buffer = (torch.empty(packed_bytes(*fixed), dtype=torch.uint8) if fixed is not None
                  else torch.empty(HEADER_INTS, dtype=torch.int64))
        return _Posted(key, buffer, self.comm.recv(buffer, src, async_op=True), fixed)

    def recv(self, key: MessageKey, src: int, *, what: str, expect: Shape | None = None) -> torch.Tensor:
        """Receive the message ``key`` from ``src``; ``what`` says in errors what it is for."""
        tensor = self._stash.pop((src, key), None)
        while tensor is None:
            got_key, got = self._recv_one(src)
            if got_key == key:
                tensor = got
            else:
                self._stash[(src, got_key)] = got
        if expect is not None and (tensor.shape, tensor.dtype) != expect:
            raise PipelineError(f"stage {self.comm.rank} expected {what} from stage {src} as {_spec(*expect)} but "
                                f"received {spec(tensor)}")
        return tensor

    def _recv_one(self, src: int) -> tuple[MessageKey, torch.Tensor]:
        """Take the next message from ``src`` off the wire."""
        posted = self._posted.pop(src, None)
        if posted is None and self._incoming.get(src):
            posted = self._post(src)  # the next message is a known act/grad: same path, just later
        if posted is None:  # tied values and the like: always split
            header = torch.empty(HEADER_INTS, dtype=torch.int64)
            self.comm.recv(header, src)
        else:
            posted.handle.wait()
            header = posted.buffer if posted.packed is None else posted.buffer[:HEADER_INTS * 8].view(torch.int64)
        key, dtype, shape = decode(header, self.comm.rank, src)
        if key[0] == "abort":
            raise PipelineAborted(f"stage {src} failed and aborted the pipeline; read its error")
        if posted is not None and (key != posted.key or (posted.packed and posted.packed != (shape, dtype))):
            raise PipelineError(f"stage {self.comm.rank} expected {posted.key} from stage {src} next but received "
                                f"{key} as {_spec(shape, dtype)} (do all stages run the same schedule?)")
        if posted is not None and posted.packed is not None:
            payload = unpack(posted.buffer, dtype, shape)[1]
        else:
            payload = torch.empty(shape, dtype=dtype)
            self.comm.recv(payload, src)
            if self.static_shapes and key[0] in ("act", "grad"):
                self._received.setdefault((key[0], src, key[2]), (shape, dtype))
        return key, payload

    # -- ending ----------------------------------------------------------------------------------
    def flush(self) -> None:
        """Wait until every message sent so far has been received."""
        for handle, _ in self._pending:
            handle.wait()
        self._pending.clear()

    def abort(self, peers: list[int], wait_s: float = 2.0) -> None:
        """Tell ``peers`` this stage failed; best effort, waits at most ``wait_s`` for them to take it."""
        sends = []
        for peer in peers:
            header = encode(("abort", 0, 0))
            nxt = self._outgoing.get(peer)
            fixed = self._sent.get((nxt[0][0], peer, nxt[0][2])) if nxt else None
            message = pack(header, size=packed_bytes(*fixed)) if fixed is not None else header
            try:
                sends.append((self.comm.send(message, peer, async_op=True), message))
            except RuntimeError:
                continue
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and not all(h.is_completed() for h, _ in sends):
            time.sleep(0.01)
        self._stash.clear()
