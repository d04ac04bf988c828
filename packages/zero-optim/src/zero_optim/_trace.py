"""The order stage 3's units were needed in last time, replayed to prefetch them."""

from __future__ import annotations

from dataclasses import dataclass, field

from ._partition import GatherUnit

__all__ = ["UseOrder"]


@dataclass
class UseOrder:
    """The order units were needed in, last time; replayed to prefetch."""

    order: list[GatherUnit] = field(default_factory=list)
    seen: list[GatherUnit] = field(default_factory=list)
    cursor: int = 0
    on_track: bool = True

    def start(self) -> None:
        self.seen, self.cursor, self.on_track = [], 0, bool(self.order)

    def record(self, unit: GatherUnit) -> None:
        self.seen.append(unit)
        if self.on_track and self.cursor < len(self.order) and self.order[self.cursor] is unit:
            self.cursor += 1
        else:
            self.on_track = False

    def finish(self) -> None:
        if self.seen and self.seen != self.order:
            self.order = self.seen
        self.seen = []
