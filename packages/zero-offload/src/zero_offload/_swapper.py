"""The swapper: which tensors are in host buffers, reading ahead and writing back within a budget.

Every key is a file. A key's bytes are in a host buffer while they are being read,
borrowed by callers (counted: each ``get`` until its ``put``/``release``), being
written, or kept as a clean copy that may be dropped at any time. All buffers
together never exceed ``budget`` bytes: to make room the swapper first drops clean
copies (those not about to be used first), then waits for a write, then takes the
buffer of a read ahead; a ``get`` that still cannot fit raises, naming what is
borrowed. A failed read never hands out its buffer; a failed write keeps it (the
only copy) and fails every ``flush`` until the key is written again; either error is
raised by that key's own ``get``/``flush``, not by another key's. Told the order keys will be used
(``prefetch``), it reads ahead in that order as far as the budget allows -- with a
budget of two layers' state this is double buffering -- and keeps doing so as
buffers come free. ``put`` writes back only what the caller changed.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._io import ALIGN, BlockIO, IOHandle, aligned_empty

__all__ = ["SwapStats", "Swapper"]


@dataclass
class SwapStats:
    """Counters since the store was made (bytes are the padded sizes that moved)."""

    bytes_read: int = 0
    bytes_written: int = 0
    reads_prefetched: int = 0  # gets served by a read started ahead of time
    reads_on_demand: int = 0  # gets that had to start their read and wait for it
    peak_buffer_bytes: int = 0


@dataclass
class _Entry:
    key: str
    path: Path
    dtype: torch.dtype
    numel: int
    nbytes: int  # padded to ALIGN
    # disk: only in the file | reading | ready: the buffer holds the file's bytes, or newer ones being
    # borrowed | writing | unwritten: a write failed, the only copy of the data is the buffer
    state: str = "disk"
    holds: int = 0  # borrows: get() without put()/release()
    buffer: torch.Tensor | None = None
    io: IOHandle | None = None
    error: BaseException | None = None  # this key's last I/O failure, raised at its next get/flush
    prefetched: bool = False
    last_use: int = 0

    def view(self) -> torch.Tensor:
        assert self.buffer is not None
        return self.buffer[:self.numel * self.dtype.itemsize].view(self.dtype)


@dataclass
class Swapper:
    io: BlockIO
    budget: int
    pin: bool = False
    entries: dict[str, _Entry] = field(default_factory=dict)
    stats: SwapStats = field(default_factory=SwapStats)
    _used: int = 0  # bytes of every buffer allocated, free ones included
    _free: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    _queue: deque[str] = field(default_factory=deque)
    _in_flight: dict[str, _Entry] = field(default_factory=dict)  # entries with a read or write under way
    _clock: itertools.count = field(default_factory=itertools.count)

    # -- the caller's view ------------------------------------------------------------------
    def get(self, key: str) -> torch.Tensor:
        """Borrow ``key``'s tensor (a view of its buffer) until ``put`` or ``release``."""
        entry = self._entry(key)
        self._raise_error(entry)
        self._dequeue(key)
        if entry.state == "disk":
            self.stats.reads_on_demand += 1
            self._read(entry, self._demand(entry))
        if entry.state in ("reading", "writing"):
            self._finish(entry)
        if entry.prefetched:
            entry.prefetched = False
            self.stats.reads_prefetched += 1
        entry.holds += 1
        entry.last_use = next(self._clock)
        self._advance()
        return entry.view()

    def put(self, key: str, value: torch.Tensor) -> None:
        """Write ``value`` as ``key``'s new bytes (asynchronously); ends one borrow if there is one."""
        entry = self._entry(key)
        check_put(key, value, entry.numel, entry.dtype)
        if entry.state == "reading":  # its bytes are about to be replaced: a failed read does not matter
            try:
                self._finish(entry)
            except OSError:
                entry.error = None
        elif entry.state == "writing":
            self._finish(entry)
        buffer = entry.buffer if entry.buffer is not None else self._demand(entry)
        entry.buffer = buffer
        view = entry.view()
        if value.data_ptr() != view.data_ptr():
            view.copy_(value.reshape(-1))
        entry.holds = max(entry.holds - 1, 0)
        entry.last_use = next(self._clock)
        try:
            entry.io = self.io.submit(entry.path, buffer, write=True)
            self._in_flight[key] = entry
        except OSError as exc:
            entry.state, entry.error = "unwritten", exc
            raise
        entry.state, entry.error = "writing", None
        self.stats.bytes_written += entry.nbytes

    def release(self, key: str) -> None:
        """End a read-only borrow: nothing is written."""
        entry = self._entry(key)
        entry.holds = max(entry.holds - 1, 0)
        self._advance()

    def prefetch(self, keys: list[str]) -> None:
        self._queue = deque(k for k in dict.fromkeys(keys) if k in self.entries)
        self._advance()

    def enqueue(self, key: str) -> None:
        """Read ``key`` ahead too, after the keys already queued."""
        self._entry(key)
        if key not in self._queue:
            self._queue.append(key)
        self._advance()

    def wait_write(self, key: str) -> None:
        entry = self._entry(key)
        if entry.state == "writing":
            self._finish(entry)
        if entry.state == "unwritten":
            self._raise_error(entry, keep=True)

    def flush(self) -> None:
        """Wait for every write; raise the first failure (a key whose write failed stays failing
        until it is put again)."""
        for entry in list(self._in_flight.values()):
            if entry.state == "writing":
                self._finish(entry)
        for entry in self.entries.values():
            if entry.state == "unwritten":
                self._raise_error(entry, keep=True)

    def forget(self) -> None:
        """Finish all I/O and forget every clean copy not borrowed: the next get of such a key reads
        its file. The buffers stay in the pool, to be reused without faulting in new pages."""
        self.flush()
        for entry in self.entries.values():
            if entry.state == "reading":
                self._finish_quietly(entry)
            if entry.state == "ready" and not entry.holds:
                self._recycle(entry)

    def free_all(self) -> None:
        """Finish all I/O and give every buffer back to the allocator."""
        try:
            self.forget()
        finally:
            for entry in self.entries.values():
                if entry.io is not None:
                    self._finish_quietly(entry)
                entry.buffer, entry.state, entry.holds = None, "disk", 0
            self._free.clear()
            self._used = 0

    def delete(self, key: str) -> None:
        """Forget ``key``: finish its I/O, give its buffer back to the pool, remove its file."""
        entry = self._entry(key)
        if entry.holds:
            raise RuntimeError(f"cannot delete {key!r}: it is borrowed (get() without put()/release())")
        if key in self._queue:
            self._queue.remove(key)
        if entry.io is not None:
            self._finish_quietly(entry)  # a failed write of a key being deleted loses nothing wanted
        self._recycle(entry)
        del self.entries[key]
        entry.path.unlink(missing_ok=True)

    def held(self) -> list[str]:
        return [k for k, e in self.entries.items() if e.holds]

    # -- internals ----------------------------------------------------------------------------
    def _entry(self, key: str) -> _Entry:
        try:
            return self.entries[key]
        except KeyError:
            raise KeyError(f"no state named {key!r} in the store") from None

    @staticmethod
    def _raise_error(entry: _Entry, keep: bool = False) -> None:
        if entry.error is not None:
            error = entry.error
            if not keep and entry.state != "unwritten":
                entry.error = None  # a failed read: the next get tries the file again
            raise error

    def _dequeue(self, key: str) -> None:
        if key in self._queue:
            while self._queue and self._queue.popleft() != key:
                pass

    def _read(self, entry: _Entry, buffer: torch.Tensor) -> None:
        entry.buffer = buffer
        try:
            entry.io = self.io.submit(entry.path, buffer, write=False)
            self._in_flight[entry.key] = entry
        except BaseException:
            self._recycle(entry)  # nothing was read: the buffer is never handed out
            raise
        entry.state = "reading"
        self.stats.bytes_read += entry.nbytes

    def _finish(self, entry: _Entry) -> None:
        """Wait for ``entry``'s I/O. After a read the buffer holds the file's bytes; a failed read
        gives its buffer back (never served); a failed write keeps it (the only copy of the data)."""
        io, entry.io = entry.io, None
        self._in_flight.pop(entry.key, None)
        if io is not None:
            try:
                io.wait()
            except BaseException as exc:
                if entry.state == "reading":
                    self._recycle(entry)
                else:
                    entry.state, entry.error = "unwritten", exc
                raise
        entry.state = "ready"

    def _finish_quietly(self, entry: _Entry) -> None:
        """``_finish``, with a failure kept on the entry for its own get/flush to raise."""
        try:
            self._finish(entry)
        except OSError as exc:
            entry.error = exc

    def _reap(self) -> None:
        for entry in [e for e in self._in_flight.values() if e.io is not None and e.io.done()]:
            self._finish_quietly(entry)

    def _recycle(self, entry: _Entry) -> None:
        if entry.buffer is not None:
            self._free.setdefault(entry.buffer.numel(), []).append(entry.buffer)
            entry.buffer = None
        entry.state = "disk"
        entry.prefetched = False

    def _advance(self) -> None:
        """Start reads for the queued keys, in order, while the budget allows."""
        self._reap()
        for key in self._queue:
            entry = self.entries[key]
            if entry.state != "disk" or entry.error is not None:
                continue
            buffer = self._acquire(entry, prefetch=True)
            if buffer is None:
                return
            try:
                self._read(entry, buffer)
            except OSError as exc:
                entry.error = exc  # raised by this key's own get
                continue
            entry.prefetched = True

    def _demand(self, entry: _Entry) -> torch.Tensor:
        buffer = self._acquire(entry, prefetch=False)
        assert buffer is not None  # a demand either gets a buffer or raises
        return buffer

    def _acquire(self, entry: _Entry, prefetch: bool) -> torch.Tensor | None:
        """A buffer of ``entry.nbytes`` within the budget (None for a prefetch that does not fit)."""
        n = entry.nbytes
        while True:
            if self._free.get(n):
                return self._free[n].pop()
            if self._used + n <= self.budget:
                self._used += n
                self.stats.peak_buffer_bytes = max(self.stats.peak_buffer_bytes, self._used)
                return aligned_empty(n, pin=self.pin)
            spare = next((size for size, bufs in self._free.items() if bufs), None)
            if spare is not None:  # a free buffer of another size: give its bytes back
                self._free[spare].pop()
                self._used -= spare
                continue
            self._reap()
            victim = self._victim(protect_queue=prefetch)
            if victim is not None:
                self._recycle(victim)
                continue
            if prefetch:
                return None
            # a demand waits: first for a write (its buffer becomes a clean copy), then for a read
            # ahead (the one needed last), whose buffer it takes
            writing = [e for e in self._in_flight.values() if e.state == "writing"]
            if writing:
                self._finish_quietly(min(writing, key=lambda e: e.last_use))
                continue
            order = {k: i for i, k in enumerate(self._queue)}
            reading = [e for e in self._in_flight.values() if e.state == "reading"]
            if reading:
                ahead = max(reading, key=lambda e: order.get(e.key, len(order)))
                self._finish_quietly(ahead)
                self._recycle(ahead)
                continue
            held = self.held()
            raise MemoryError(
                f"the NVMe store's buffer budget of {human_bytes(self.budget)} cannot hold {entry.key!r} "
                f"({human_bytes(n)}): {len(held)} keys are borrowed by get() without put()/release() "
                f"({', '.join(held[:6])}{', ...' if len(held) > 6 else ''}). Raise buffer_bytes.")

    def _victim(self, protect_queue: bool) -> _Entry | None:
        """The clean copy to drop: one not queued for use, least recently used; then (for a demand
        read) queued ones, the one needed last first."""
        queued = set(self._queue)
        clean = [e for e in self.entries.values() if e.state == "ready" and not e.holds]
        unqueued = [e for e in clean if e.key not in queued]
        if unqueued:
            return min(unqueued, key=lambda e: e.last_use)
        if protect_queue or not clean:
            return None
        order = {k: i for i, k in enumerate(self._queue)}
        return max(clean, key=lambda e: order.get(e.key, -1))


def human_bytes(nbytes: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes / 1024:.0f} KiB"


def check_put(key: str, value: torch.Tensor, numel: int, dtype: torch.dtype) -> None:
    """A store holds each key at one size and dtype: refuse anything else (no silent cast or broadcast)."""
    if value.numel() != numel or value.dtype != dtype:
        raise ValueError(f"put {key!r}: got {value.numel()} elements of {value.dtype}; the store holds "
                         f"{numel} elements of {dtype}")


def padded(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN
