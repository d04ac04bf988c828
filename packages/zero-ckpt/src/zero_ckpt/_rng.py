"""Named RNG streams for model-parallel regions (Megatron's CUDA RNG tracker, on any device).

In a tensor-parallel region each rank holds a different slice of a weight, so
dropout there must draw a different mask on each rank, while dropout outside the
region must draw the same one. The tracker keeps named generator states apart
from the default one: ``with tracker.fork("model-parallel"):`` swaps a named state
in, runs the block, and swaps the advanced state back out. Activation
checkpointing records the states before a checkpointed call and replays them for
its recomputation.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["RNGStatesTracker", "process_rng_state", "set_process_rng_state"]


class RNGStatesTracker:
    """Named RNG states for ``device`` (default: the current CUDA device when there is one, else the
    CPU generator)."""

    def __init__(self, device: torch.device | str | None = None):
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self._states: dict[str, torch.Tensor] = {}

    def _get(self) -> torch.Tensor:
        return torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else torch.get_rng_state()

    def _set(self, state: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)

    def add(self, name: str, seed: int) -> None:
        """A new stream ``name`` seeded with ``seed`` (e.g. base seed + 2718 + tensor-parallel rank)."""
        if name in self._states:
            raise ValueError(f"RNG state {name!r} already exists")
        outer = self._get()
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                torch.cuda.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        self._states[name] = self._get()
        self._set(outer)

    def get_states(self) -> dict[str, torch.Tensor]:
        # The state tensors are never changed in place (a fork stores a new one), so sharing them is a
        # snapshot; and no tensor op runs, which a selective-checkpoint recomputation would not expect.
        return dict(self._states)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._states = dict(states)

    @contextmanager
    def fork(self, name: str = "model-parallel") -> Iterator[None]:
        """Draw from stream ``name`` inside the block."""
        if name not in self._states:
            raise KeyError(f"no RNG state named {name!r}; add it first (tracker.add({name!r}, seed))")
        outer = self._get()
        self._set(self._states[name])
        try:
            yield
        finally:
            self._states[name] = self._get()
            self._set(outer)


def process_rng_state() -> bytes:
    """This process's default generators (torch, Python, every CUDA device), serialised for a checkpoint."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def set_process_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
