"""The comm ledger: what every collective moved, per kind and per group.

Two byte counts are booked per call, as nccl-tests define them:

* ``payload_bytes`` -- the size ``S`` of the collective's data: the tensor for
  all_reduce and broadcast, the *full* (gathered / pre-scatter) tensor for
  all_gather and reduce_scatter, the message for send/recv. Padding added to make
  a size divide the world is counted, because it travels.
* ``bus_bytes`` -- ``S`` times the algorithmic factor for a ring of ``n`` ranks:
  ``2(n-1)/n`` for all_reduce, ``(n-1)/n`` for reduce_scatter, all_gather and all_to_all,
  ``1`` for broadcast and point-to-point, ``0`` for barrier. It is the traffic
  one rank's link carries, so it is what ZeRO's volume formulas predict.

Later packages prove their communication volume against these counts.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = ["COLLECTIVE_KINDS", "CommLedger", "LedgerEntry", "bus_factor"]

COLLECTIVE_KINDS = (
    "all_reduce",
    "reduce_scatter",
    "all_gather",
    "broadcast",
    "all_to_all",
    "send",
    "recv",
    "barrier",
)


def bus_factor(kind: str, world_size: int) -> float:
    """The nccl-tests bus-bandwidth factor of one collective on ``world_size`` ranks."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    n = world_size
    if kind == "all_reduce":
        return 2.0 * (n - 1) / n
    if kind in ("reduce_scatter", "all_gather", "all_to_all"):
        return (n - 1) / n
    if kind in ("broadcast", "send", "recv"):
        return 1.0
    if kind == "barrier":
        return 0.0
    raise ValueError(f"unknown collective kind {kind!r}; expected one of {COLLECTIVE_KINDS}")


@dataclass(frozen=True)
class LedgerEntry:
    """Totals for one (kind, group) pair."""

    calls: int = 0
    payload_bytes: int = 0
    bus_bytes: float = 0.0

    def __add__(self, other: LedgerEntry) -> LedgerEntry:
        return LedgerEntry(
            self.calls + other.calls,
            self.payload_bytes + other.payload_bytes,
            self.bus_bytes + other.bus_bytes,
        )


class CommLedger:
    """Thread-safe running totals of calls and bytes per collective kind and group.

    One ledger may be shared by several communicators (one per group), so the
    totals of a whole training step can be read in one place.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], list] = {}  # [calls, payload_bytes, bus_bytes]

    def book(self, kind: str, group: str, payload_bytes: int, world_size: int) -> None:
        """Record one call of ``kind`` on ``group`` moving ``payload_bytes``."""
        bus = payload_bytes * bus_factor(kind, world_size)  # on every call: this is the hot path
        with self._lock:
            totals = self._entries.get((kind, group))
            if totals is None:
                self._entries[(kind, group)] = [1, payload_bytes, bus]
            else:
                totals[0] += 1
                totals[1] += payload_bytes
                totals[2] += bus

    def entry(self, kind: str, group: str | None = None) -> LedgerEntry:
        """Totals for one kind, on one group or (``group=None``) summed over groups."""
        total = LedgerEntry()
        for (k, g), e in self.snapshot().items():
            if k == kind and (group is None or g == group):
                total = total + e
        return total

    def snapshot(self) -> dict[tuple[str, str], LedgerEntry]:
        """A copy of every (kind, group) total booked so far."""
        with self._lock:
            return {key: LedgerEntry(*totals) for key, totals in self._entries.items()}

    def reset(self) -> None:
        with self._lock:
            self._entries.clear()

    @contextmanager
    def measure(self) -> Iterator[CommLedger]:
        """Yield a fresh ledger holding only what is booked inside the block.

        The totals are also kept in this ledger, so nested measurements compose.
        """
        before = self.snapshot()
        delta = CommLedger()
        try:
            yield delta
        finally:
            after = self.snapshot()
            for key, e in after.items():
                b = before.get(key, LedgerEntry())
                diff = LedgerEntry(e.calls - b.calls, e.payload_bytes - b.payload_bytes,
                                   e.bus_bytes - b.bus_bytes)
                if diff.calls:
                    delta._entries[key] = [diff.calls, diff.payload_bytes, diff.bus_bytes]

    def summary(self) -> str:
        """A small table, one line per (kind, group), for logs."""
        rows = sorted(self.snapshot().items())
        if not rows:
            return "comm ledger: nothing booked"
        lines = [f"{'kind':<15}{'group':<12}{'calls':>8}{'payload MiB':>14}{'bus MiB':>12}"]
        for (kind, group), e in rows:
            lines.append(
                f"{kind:<15}{group:<12}{e.calls:>8}{e.payload_bytes / 2**20:>14.3f}"
                f"{e.bus_bytes / 2**20:>12.3f}"
            )
        return "\n".join(lines)


_DEFAULT_LEDGERS: weakref.WeakKeyDictionary[object, CommLedger] = weakref.WeakKeyDictionary()


def default_ledger() -> CommLedger:
    """The ledger communicators book into when given none: one per world, shared by every group.

    So all of a process's traffic is in one place unless a caller asks for a
    separate ledger. A new world (after destroy and re-init) gets a new ledger.
    """
    import torch.distributed as dist

    world = dist.group.WORLD if dist.is_initialized() else None
    if world is None:
        raise RuntimeError("no default ledger: torch.distributed is not initialised")
    ledger = _DEFAULT_LEDGERS.get(world)
    if ledger is None:
        ledger = _DEFAULT_LEDGERS.setdefault(world, CommLedger())
    return ledger
