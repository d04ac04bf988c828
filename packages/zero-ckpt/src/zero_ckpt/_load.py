"""Loading a checkpoint all or nothing: every rank verifies and stages, the ranks agree, then state changes.

A load that fails on one rank (a corrupted shard, a missing file, a shape that does not
fit) must not leave the other ranks waiting in a collective, nor any rank with half its
state overwritten. So :func:`prepare_load` first does everything that can fail without
touching the caller's state: it opens and verifies the checkpoint, checks every item's
shapes, unpickles the client state and this rank's RNG states (data only), and reads
every piece this rank holds into host staging memory, verifying the CRC of every block.
Then the ranks exchange their outcome (one all-gather of a short message): if any rank
failed, every rank raises the same :class:`CheckpointError`, naming the ranks and files
at fault, and nothing has changed anywhere. Only then does :meth:`PreparedLoad.apply`
copy the staged pieces into the live state and restore counters and RNG.

The price is host memory for this rank's share of the loaded state while it is staged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import torch

from ._exchange import exchange
from ._format import CheckpointError, dtype_from_name
from ._items import Checkpointable, _items_state
from ._reader import CheckpointReader
from ._rng import set_process_rng_state

if TYPE_CHECKING:
    from ._state import CheckpointManager

__all__ = ["PreparedLoad", "prepare_load"]

Check = Callable[[CheckpointReader, dict[str, Any]], None]
Items = Mapping[str, Any] | Callable[[CheckpointReader], Mapping[str, Any]]


@dataclass
class PreparedLoad:
    """A verified checkpoint staged in host memory, agreed on by every rank; ``apply`` puts it in place."""

    tag: str
    path: Path
    client: dict[str, Any]
    items: Mapping[str, Any]
    state: Mapping[str, Any]
    staged: dict[tuple[str, int, int], torch.Tensor]
    rng: dict[str, Any] | None
    _rng_restored: bool = field(default=False)

    def apply(self, items: Mapping[str, Any] | None = None, *, restore_rng: bool = True) -> Any:
        """Fill the prepared items' pieces, restore checkpointable items' counters and, once, this rank's
        RNG; return the client state. ``items`` (default: every prepared item) maps prepared keys to the
        prepared object itself or to a fresh sharded state over the same tensors and ranges (the same
        module state taken again inside a gather), to apply items at different times."""
        for key, obj in (self.items if items is None else items).items():
            if key not in self.items:
                raise CheckpointError(f"item {key!r} was not prepared from {self.path}")
            prefix = f"{key}/"
            state = ({n: e for n, e in self.state.items() if n.startswith(prefix)} if obj is self.items[key]
                     else _items_state({key: obj}))
            for name, entry in state.items():
                for piece in entry.pieces:
                    staged = self.staged.get((name, piece.start, piece.stop))
                    if staged is None:
                        raise CheckpointError(f"{name}[{piece.start}:{piece.stop}] was not prepared from {self.path}")
                    with torch.no_grad():
                        piece.data.copy_(staged)
            if isinstance(obj, Checkpointable):
                obj.load_checkpoint_meta(self.client["items"][key])
        if restore_rng and self.rng is not None and not self._rng_restored:
            set_process_rng_state(self.rng)
            self._rng_restored = True
        return self.client["client_state"]


def _stage(reader: CheckpointReader, state: Mapping[str, Any]) -> dict[tuple[str, int, int], torch.Tensor]:
    for name, entry in state.items():  # every shape before any read
        want = reader.entry(name)
        if list(entry.global_shape) != want.shape:
            raise CheckpointError(f"{name}: the checkpoint holds shape {tuple(want.shape)}, this model "
                                  f"{tuple(entry.global_shape)}")
    staged = {}
    for name, entry in state.items():
        saved = dtype_from_name(reader.entry(name).dtype)
        for piece in entry.pieces:
            if piece.data.numel() != piece.stop - piece.start:
                raise CheckpointError(f"{name}: a piece [{piece.start}, {piece.stop}) of {piece.data.numel()} "
                                      "elements")
            buf = torch.empty(piece.stop - piece.start, dtype=saved)
            reader.read_into(name, piece.start, piece.stop, buf)
            staged[(name, piece.start, piece.stop)] = buf
    return staged


def _check_rng(rng: dict[str, Any], reader: CheckpointReader, rank: int) -> None:
    where = reader.dir / reader.manifests[rank].extra_file
    try:
        probe = torch.Generator()
        probe.set_state(rng["torch"])
        state = rng["python"]
        if not (isinstance(state, tuple) and len(state) == 3 and isinstance(state[1], tuple)):
            raise ValueError("not a Python random state")
    except (RuntimeError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{where} does not hold valid RNG states ({exc})") from exc


def prepare_load(manager: CheckpointManager, items: Items, tag: str | None = None, *,
                 restore_rng: bool = True, check: Check | None = None) -> PreparedLoad:
    """Verify and stage checkpoint ``tag`` (default: ``latest``) for ``items`` on this rank, and agree with
    every rank of ``manager.comm`` that all of them could; collective. ``check(reader, client)`` may
    raise to refuse the checkpoint on this rank (the caller's own conditions); it runs first. ``items``
    may be a function of the opened checkpoint (to load what it holds), called after ``check``."""
    comm = manager.comm
    manager.wait()
    comm.barrier()  # every rank's earlier saves are committed before any rank reads `latest`
    problem, resolved, prepared, cause = "", "", None, None
    try:
        reader = CheckpointReader(manager.root, tag)
        resolved = reader.tag
        client = reader.client()
        if check is not None:
            check(reader, client)
        items = items(reader) if callable(items) else items
        state = _items_state(items)
        for key, obj in items.items():
            if isinstance(obj, Checkpointable) and key not in client["items"]:
                raise CheckpointError(f"checkpoint {reader.dir} has no counters for item {key!r}")
        rng = None
        if restore_rng and comm.rank < reader.meta.world_size:
            rng = reader.extra(comm.rank)
            _check_rng(rng, reader, comm.rank)
        staged = _stage(reader, state)
        prepared = PreparedLoad(reader.tag, reader.dir, client, items, state, staged, rng)
    except Exception as exc:  # any failure here is told to every rank, then raised
        problem, cause = f"rank {comm.rank}: {exc}", exc
    outcomes = [msgspec.json.decode(r, type=tuple[str, str])
                for r in exchange(comm, msgspec.json.encode((problem, resolved)))]
    problems = [p for p, _ in outcomes if p]
    tags = {t for p, t in outcomes if not p}
    if not problems and len(tags) > 1:
        problems = [f"the ranks resolved different checkpoints: {sorted(tags)}"]
    if problems:
        named = tag or next((t for _, t in outcomes if t), "latest")
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more ranks" if len(problems) > 3 else "")
        raise CheckpointError(f"checkpoint {manager.root / named} not loaded, nothing "
                              f"changed: {shown}") from cause
    assert prepared is not None
    return prepared
