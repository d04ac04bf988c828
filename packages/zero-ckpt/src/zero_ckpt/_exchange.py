"""Small collective helpers a save and a load share: every rank's bytes on every rank; range arithmetic."""

from __future__ import annotations

import torch

from zero_comm import Communicator

from ._format import as_bytes

__all__ = ["exchange", "subtract"]


def exchange(comm: Communicator, payload: bytes) -> list[bytes]:
    """Every rank's ``payload``, on every rank."""
    if comm.world_size == 1:
        return [payload]
    size = torch.tensor([len(payload)], dtype=torch.int64)
    sizes = comm.all_gather(size).tolist()
    buf = torch.zeros(max(sizes), dtype=torch.uint8)
    if payload:
        buf[:len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    gathered = comm.all_gather(buf).view(comm.world_size, -1)
    return [bytes(as_bytes(gathered[r, :sizes[r]].contiguous())) for r in range(comm.world_size)]


def subtract(ranges: list[tuple[int, int]], covered: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for start, stop in ranges:
        pos = start
        for a, b in sorted(covered):
            if b <= pos or a >= stop:
                continue
            if a > pos:
                out.append((pos, a))
            pos = max(pos, b)
        if pos < stop:
            out.append((pos, stop))
    return out
