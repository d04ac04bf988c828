"""Checking a checkpoint's metadata before any of it is used, and unpickling nothing but data.

``meta.json`` is sealed: its last field is a CRC-32 of its own msgspec encoding with
that field zero, and it records a CRC-32 of every rank manifest and of ``client.pt``.
Each manifest is then checked for what a CRC cannot promise: plain file names, one
block checksum per block, pieces of known tensors in their saved dtype and range that
tile the data file end to end, and, over all ranks, every element of every tensor held.
CRCs catch accidents (a flipped bit, an edited digit), not an attacker, who can fix
them up; what stops a crafted file from running code is that ``client.pt`` and the
``.extra`` files are unpickled with ``torch.load(weights_only=True)``: tensors, dtypes
and plain containers and numbers only.
"""

from __future__ import annotations

import io
import pickle
import re
import zlib
from pathlib import Path
from typing import Any

import msgspec
import torch

from ._format import READABLE_VERSIONS, CheckpointError, CheckpointMeta, RankManifest, dtype_from_name

__all__ = ["check_coverage", "open_manifest", "open_meta", "safe_load", "seal_meta"]


def seal_meta(meta: CheckpointMeta) -> bytes:
    """``meta`` encoded with its own checksum filled in."""
    unsealed = msgspec.structs.replace(meta, checksum=0)
    return msgspec.json.encode(msgspec.structs.replace(meta, checksum=zlib.crc32(msgspec.json.encode(unsealed))))


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: {path.parent} is not a complete checkpoint") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint's {what} ({exc})") from exc


def _decode(raw: bytes, path: Path, kind: type) -> Any:
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.DecodeError as exc:
        raise CheckpointError(f"{path} is corrupted: {exc}") from exc


def _plain(name: str, path: Path, field: str) -> None:
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise CheckpointError(f"{path}: {field} {name!r} is not a file name in the checkpoint directory")


def open_meta(path: Path) -> CheckpointMeta:
    """Decode and verify ``meta.json``: its version, its own checksum, and that it is self-consistent."""
    meta: CheckpointMeta = _decode(_read(path, "metadata"), path, CheckpointMeta)
    if meta.format_version not in READABLE_VERSIONS:
        raise CheckpointError(f"{path}: format version {meta.format_version}, this reader reads "
                              f"{', '.join(map(str, READABLE_VERSIONS))}")
    if meta.format_version >= 2:
        unsealed = msgspec.json.encode(msgspec.structs.replace(meta, checksum=0))
        if zlib.crc32(unsealed) != meta.checksum:
            raise CheckpointError(f"{path} fails its checksum: the metadata was changed or corrupted")
        if len(meta.manifest_checksums) != len(meta.ranks):
            raise CheckpointError(f"{path} lists {len(meta.ranks)} manifests and {len(meta.manifest_checksums)} "
                                  "manifest checksums")
    if meta.world_size != len(meta.ranks) or meta.world_size < 1:
        raise CheckpointError(f"{path}: world size {meta.world_size} but {len(meta.ranks)} rank manifests")
    for name in [*meta.ranks, *([meta.client_file] if meta.client_file else [])]:
        _plain(name, path, "file")
    for name, entry in meta.tensors.items():
        dtype_from_name(entry.dtype)
        if any(d < 0 for d in entry.shape):
            raise CheckpointError(f"{path}: tensor {name!r} has shape {entry.shape}")
    return meta


def open_manifest(directory: Path, meta: CheckpointMeta, rank: int) -> RankManifest:
    """Decode and verify rank ``rank``'s manifest against ``meta`` and against the size of its data file."""
    path = directory / meta.ranks[rank]
    raw = _read(path, "manifest")
    if meta.format_version >= 2 and zlib.crc32(raw) != meta.manifest_checksums[rank]:
        raise CheckpointError(f"{path} fails the checksum meta.json records for it: the manifest was changed "
                              "or corrupted")
    m: RankManifest = _decode(raw, path, RankManifest)
    if m.rank != rank:
        raise CheckpointError(f"{path} is the manifest of rank {m.rank}, not of rank {rank}")
    _plain(m.data_file, path, "data_file")
    if m.extra_file:
        _plain(m.extra_file, path, "extra_file")
    if m.block_size < 1 or len(m.checksums) != -(-m.size // m.block_size) or m.size < 0:
        raise CheckpointError(f"{path}: {len(m.checksums)} block checksums do not fit {m.size} bytes in blocks of "
                              f"{m.block_size}")
    end = 0
    for p in sorted(m.pieces, key=lambda p: p.offset):
        entry = meta.tensors.get(p.name)
        if entry is None:
            raise CheckpointError(f"{path}: a piece of {p.name!r}, which meta.json does not list")
        if p.dtype != entry.dtype:
            raise CheckpointError(f"{path}: a piece of {p.name} is {p.dtype}, meta.json says {entry.dtype}")
        numel = torch.Size(entry.shape).numel()
        if not 0 <= p.start < p.stop <= numel:
            raise CheckpointError(f"{path}: piece [{p.start}, {p.stop}) of {p.name} is outside its {numel} elements")
        if p.offset != end:
            raise CheckpointError(f"{path}: piece {p.name}[{p.start}:{p.stop}] starts at byte {p.offset}; the "
                                  f"pieces before it end at {end} (offsets changed or pieces overlap)")
        end = p.offset + (p.stop - p.start) * dtype_from_name(p.dtype).itemsize
    if end != m.size:
        raise CheckpointError(f"{path}: its pieces end at byte {end}, its data file is {m.size} bytes")
    try:
        actual = (directory / m.data_file).stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"{directory / m.data_file} is missing: {directory} is not a complete checkpoint "
                              "(a shard was deleted or never written)") from None
    except OSError as exc:
        raise CheckpointError(f"{directory / m.data_file}: cannot open checkpoint data ({exc})") from exc
    if actual != m.size:
        raise CheckpointError(f"{directory / m.data_file} is {actual} bytes; its manifest says {m.size} "
                              "(truncated or overwritten)")
    return m


def check_coverage(directory: Path, meta: CheckpointMeta, manifests: list[RankManifest]) -> None:
    """Every element of every tensor is held by some rank's piece."""
    held: dict[str, list[tuple[int, int]]] = {}
    for m in manifests:
        for p in m.pieces:
            held.setdefault(p.name, []).append((p.start, p.stop))
    for name, entry in meta.tensors.items():
        pos = 0
        for start, stop in sorted(held.get(name, [])):
            if start > pos:
                break
            pos = max(pos, stop)
        numel = torch.Size(entry.shape).numel()
        if pos < numel:
            raise CheckpointError(f"{directory}: no rank's manifest holds elements from {pos} of {name} "
                                  f"({numel} elements)")


def safe_load(data: bytes, path: Path) -> Any:
    """Unpickle tensors, dtypes and plain data only; anything else is refused, naming ``path``."""
    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        what = f"it names {found.group(1)}, " if found else ""
        raise CheckpointError(f"{path}: refused to unpickle it: {what}not a tensor or plain data (a checkpoint "
                              "is loaded with weights_only=True)") from None
    except Exception as exc:  # a truncated or garbled pickle
        first = (str(exc).splitlines() or [""])[0]
        raise CheckpointError(f"{path} cannot be read: {type(exc).__name__}: {first}") from exc
