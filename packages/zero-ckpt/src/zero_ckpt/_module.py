"""A module's ``state_dict`` in a checkpoint: the record that lets an export rebuild it whole.

A ZeRO checkpoint holds a model's trained weights as the optimizer's fp32 masters, one
tensor per *distinct* parameter, named as ``named_parameters()`` names it. That is not yet
a ``state_dict`` that ``load_state_dict(strict=True)`` accepts: a weight tied to another
(a GPT's output head and its token embedding are one ``Parameter``) has a second key, and
buffers (BatchNorm statistics) and untrained weights have no master at all.
:class:`ModuleState` is the checkpoint item that carries the missing pieces: the
module's persistent buffers and untrained weights as whole tensors, and, as its counters
(plain data in ``client.pt``, which ``meta.json`` checksums), a :class:`ModuleRecord`:
every ``state_dict`` key in order, which of them are aliases of another, where the
trained weights are. Loading the item ignores the record; :func:`zero_ckpt.consolidate`
reads it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import msgspec
import torch

from ._format import CheckpointError
from ._items import tensors_state

__all__ = ["ModuleRecord", "ModuleState", "module_record"]

RECORD_VERSION = 1


class ModuleRecord(msgspec.Struct, frozen=True):
    """How a module's ``state_dict`` is laid out in a checkpoint."""

    keys: list[str]  # every state_dict key, in the module's order
    weights: str  # prefix of the trained weights' tensors (the optimizer's masters), e.g. "optimizer/master/"
    extras: str  # prefix of the buffers and untrained weights, e.g. "module/"
    buffers: list[str]  # the persistent buffers among ``keys`` (canonical names)
    frozen: list[str]  # the untrained weights among ``keys`` (canonical names)
    tied: dict[str, str]  # alias -> the canonical name holding the same tensor
    version: int = RECORD_VERSION

    def to_plain(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)

    @classmethod
    def from_plain(cls, raw: Any, where: str) -> ModuleRecord:
        try:
            record = msgspec.convert(raw, cls)
        except msgspec.ValidationError as exc:
            raise CheckpointError(f"{where}: the module record is not readable ({exc})") from None
        if record.version > RECORD_VERSION:
            raise CheckpointError(f"{where}: module record version {record.version}, this reader reads up to "
                                  f"{RECORD_VERSION}")
        return record

    def merged(self, other: ModuleRecord) -> ModuleRecord:
        """This record and another rank's (a pipeline stage holds other layers): keys in order, first seen first."""
        def union(a: list[str], b: list[str]) -> list[str]:
            return list(dict.fromkeys([*a, *b]))

        return msgspec.structs.replace(self, keys=union(self.keys, other.keys),
                                       buffers=union(self.buffers, other.buffers),
                                       frozen=union(self.frozen, other.frozen), tied={**other.tied, **self.tied})


def module_record(module: torch.nn.Module, *, weights: str, extras: str, frozen: Iterable[str] = ()) -> ModuleRecord:
    """The record of ``module``: its ``state_dict`` keys, its persistent buffers, the untrained weights
    ``frozen`` (canonical names), and every key that names the same tensor as an earlier one (a tied
    weight, a shared submodule) mapped to that earlier, canonical name -- the one ``named_parameters()``
    and ``named_buffers()`` give, under which the checkpoint holds it."""
    keys = list(module.state_dict(keep_vars=True))
    in_state = set(keys)
    canonical: dict[int, str] = {}
    tied: dict[str, str] = {}
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        if name not in in_state:  # a non-persistent buffer
            continue
        first = canonical.setdefault(id(tensor), name)
        if first != name:
            tied[name] = first
    params = {id(p) for p in module.parameters()}
    buffers = [n for n, b in module.named_buffers() if n in in_state and id(b) not in params]
    return ModuleRecord(keys, weights, extras, buffers, [n for n in frozen if n in in_state], tied)


class ModuleState:
    """A checkpoint item: a module's buffers and untrained weights (whole, replicated: the lowest rank
    writes them) with its :class:`ModuleRecord` as the item's counters. Loading fills the tensors in place
    and leaves the record alone (it describes the saved module, not one to change)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], record: ModuleRecord):
        self.tensors, self.record = tensors, record

    def sharded_state(self) -> dict[str, Any]:
        return dict(tensors_state(self.tensors))

    def checkpoint_meta(self) -> dict[str, Any]:
        return self.record.to_plain()

    def load_checkpoint_meta(self, meta: dict[str, Any]) -> None:
        del meta
