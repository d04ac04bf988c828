"""A checkpoint as one plain ``state_dict``, without a process group.

:func:`consolidate` builds whole tensors from a :class:`CheckpointReader`, whatever
world size wrote the checkpoint. Given no ``prefix`` it rebuilds the saved module's
``state_dict`` -- the trained weights (the optimizer's fp32 masters), the untrained
weights and the persistent buffers, and every tied key as the same tensor as the key it
is tied to -- from the :class:`~zero_ckpt._module.ModuleRecord` the checkpoint holds, so
that ``load_state_dict(strict=True)`` takes it. :func:`export` writes it to one file:
``torch.save``, or safetensors for a ``.safetensors`` name.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

import torch

from ._format import CheckpointError
from ._module import ModuleRecord
from ._reader import CheckpointReader

__all__ = ["consolidate", "export", "save_state_dict"]

logger = logging.getLogger("zero_ckpt")

SAFETENSORS_MISSING = ("writing .safetensors needs the safetensors package: pip install 'zero-ckpt[safetensors]' "
                       "(or 'zero-all[safetensors]')")


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _record(reader: CheckpointReader) -> ModuleRecord | None:
    items = reader.client()["items"]
    for key, meta in items.items():
        if isinstance(meta, dict) and "keys" in meta and "tied" in meta and "weights" in meta:
            return ModuleRecord.from_plain(meta, f"{reader.dir / 'client.pt'} (item {key!r})")
    return None


def _module_state(reader: CheckpointReader, dtype: torch.dtype | None, frozen: bool) -> dict[str, torch.Tensor]:
    record = _record(reader)
    if record is None:  # written before checkpoints recorded the module: what it holds, as it holds it
        # an optimizer's fp32 masters, under whatever item name it was saved as ("<item>/master/<param>")
        prefixes = sorted({n[:n.index("/master/") + len("/master/")] for n in reader.names
                           if "/master/" in n and "/" not in n[:n.index("/master/")]})
        if len(prefixes) != 1:
            seen = f"weights under each of {prefixes}" if prefixes else "no weights under <item>/master/"
            raise CheckpointError(f"checkpoint {reader.dir} holds no module record and {seen} (it has e.g. "
                                  f"{reader.names[:3]}); pass prefix=")
        prefix = prefixes[0]
        held = {n[len(prefix):]: _cast(reader.full(n), dtype) for n in reader.names if n.startswith(prefix)}
        extras = [n for n in reader.names if n.startswith("module/")]
        held.update({n.removeprefix("module/"): _cast(reader.full(n), dtype) for n in extras})
        logger.warning(f"checkpoint {reader.dir} does not record its module's state_dict (written by an older "
                       f"zero): exported {len(held)} tensors as saved ({len(extras)} buffers and untrained weights); "
                       "tied weights' second names are not restored, so load_state_dict(strict=True) may refuse it")
        return held
    skip = set() if frozen else set(record.frozen)
    found: dict[str, torch.Tensor] = {}
    for name in reader.names:
        for prefix in (record.weights, record.extras):
            if name.startswith(prefix) and name[len(prefix):] not in skip:
                found[name[len(prefix):]] = _cast(reader.full(name), dtype)
    state: dict[str, torch.Tensor] = {}
    missing = []
    for key in record.keys:
        canonical = record.tied.get(key, key)
        if canonical in skip:
            continue
        if canonical in found:
            state[key] = found[canonical]  # a tied key: the very tensor of its canonical name
        else:
            missing.append(key)
    state.update({k: v for k, v in found.items() if k not in state})
    if missing:
        logger.warning(f"checkpoint {reader.dir} holds no tensor for {len(missing)} of the module's state_dict keys "
                       f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}); they are not exported")
    return state


def consolidate(root: str | os.PathLike, tag: str | None = None, *, prefix: str | None = None,
                dtype: torch.dtype | None = None, frozen: bool = True) -> dict[str, torch.Tensor]:
    """Whole tensors from checkpoint ``tag`` (default: ``latest``), whatever world size wrote it; no process
    group needed. Without ``prefix``: the saved module's ``state_dict``, its keys in the module's order --
    trained weights, untrained weights (unless ``frozen=False``) and persistent buffers, a tied key being
    the same tensor as its canonical key. A checkpoint that predates the module record gives what it holds
    (master weights, and buffers and untrained weights where saved) with a warning. With ``prefix``: every
    tensor under it, named without it. ``dtype`` converts floating-point tensors only (a BatchNorm's
    ``num_batches_tracked`` stays int64)."""
    reader = CheckpointReader(root, tag)
    if prefix is None:
        return _module_state(reader, dtype, frozen)
    names = [n for n in reader.names if n.startswith(prefix)]
    if not names:
        raise CheckpointError(f"checkpoint {reader.dir} has no tensors under {prefix!r} "
                              f"(it has e.g. {reader.names[:3]})")
    return {n[len(prefix):]: _cast(reader.full(n), dtype) for n in names}


def save_state_dict(state: Mapping[str, torch.Tensor], out: str | os.PathLike) -> Path:
    """Write ``state`` to ``out`` atomically: safetensors when the name ends in ``.safetensors`` (a tensor
    sharing storage with one written before it, a tied weight, is written as its own copy: safetensors
    refuses shared storage, and ``load_state_dict`` fills both keys of the tied parameter from equal
    values), else ``torch.save`` (tied keys stay one tensor)."""
    out = Path(out)
    tmp = out.with_name(out.name + f".partial-{secrets.token_hex(4)}")
    try:
        if out.suffix == ".safetensors":
            try:
                from safetensors.torch import save_file
            except ImportError:
                raise CheckpointError(SAFETENSORS_MISSING) from None
            seen: dict[tuple[int, torch.device], str] = {}
            flat, tied = {}, {}
            for name, value in state.items():
                where = (value.untyped_storage().data_ptr(), value.device)
                shared = value.numel() > 0 and where in seen
                if shared:
                    tied[name] = seen[where]
                seen.setdefault(where, name)
                flat[name] = value.clone() if shared else value.contiguous()
            save_file(flat, str(tmp), metadata={"format": "pt", "zero.tied": json.dumps(tied)})
        else:
            with open(tmp, "wb") as f:
                torch.save(dict(state), f)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def export(root: str | os.PathLike, out: str | os.PathLike, tag: str | None = None, *, prefix: str | None = None,
           dtype: torch.dtype = torch.float32, frozen: bool = True) -> Path:
    """Write one ``state_dict`` file that plain ``torch.load`` (or ``safetensors.torch.load_file``, for a
    ``.safetensors`` name) reads: :func:`consolidate`'s tensors (fp32 by default, or bf16/fp16), written
    atomically. Without ``prefix`` it loads with ``strict=True`` into the model that was saved."""
    return save_state_dict(consolidate(root, tag, prefix=prefix, dtype=dtype, frozen=frozen), out)
