"""Reading checkpoints without a process group: any piece of any tensor, verified as it is read.

:class:`CheckpointReader` opens one checkpoint (``latest`` by default) and reads any
range of any tensor, from whichever ranks' files hold it, checking the CRC of every
block it touches. :func:`consolidate` and :func:`export` build whole tensors from it,
whatever world size wrote the checkpoint.
"""

from __future__ import annotations

import difflib
import io
import os
import secrets
import zlib
from pathlib import Path
from typing import Any

import msgspec
import torch

from ._format import (
    FORMAT_VERSION,
    CheckpointError,
    CheckpointMeta,
    PieceEntry,
    RankManifest,
    TensorEntry,
    as_bytes,
    dtype_from_name,
    read_exact,
)

__all__ = ["CheckpointReader", "consolidate", "export", "latest_tag"]


def latest_tag(root: str | os.PathLike) -> str:
    """The tag ``<root>/latest`` names."""
    path = Path(root) / "latest"
    try:
        tag = path.read_text().strip()
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint in {root}: it has no 'latest' file") from None
    if tag and not (Path(root) / tag).exists():  # an overwrite died between its renames: the old copy
        aside = sorted(Path(root).glob(f"{tag}.partial-old-*"))
        if aside and (aside[0] / "meta.json").is_file():
            return aside[0].name
    if not tag or not (Path(root) / tag / "meta.json").is_file():
        raise CheckpointError(f"{path} names {tag!r}, which is not a complete checkpoint in {root}")
    return tag



class CheckpointReader:
    """Reads one checkpoint, piece by piece, without a process group."""

    def __init__(self, root: str | os.PathLike, tag: str | None = None):
        self.root = Path(root)
        self.tag = tag or latest_tag(self.root)
        self.dir = self.root / self.tag
        self.meta = self._decode(self.dir / "meta.json", CheckpointMeta)
        if self.meta.format_version != FORMAT_VERSION:
            raise CheckpointError(f"{self.dir}: format version {self.meta.format_version}, this reader reads "
                                  f"{FORMAT_VERSION}")
        self.manifests = [self._decode(self.dir / f, RankManifest) for f in self.meta.ranks]
        self._index: dict[str, list[tuple[PieceEntry, RankManifest]]] = {}
        for m in self.manifests:
            for p in m.pieces:
                self._index.setdefault(p.name, []).append((p, m))

    def _decode(self, path: Path, kind: type) -> Any:
        try:
            return msgspec.json.decode(path.read_bytes(), type=kind)
        except FileNotFoundError:
            raise CheckpointError(f"{path} is missing: {self.dir} is not a complete checkpoint") from None
        except msgspec.DecodeError as exc:
            raise CheckpointError(f"{path} is corrupted: {exc}") from exc

    @property
    def names(self) -> list[str]:
        return list(self.meta.tensors)

    def entry(self, name: str) -> TensorEntry:
        if name not in self.meta.tensors:
            near = difflib.get_close_matches(name, self.names, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise CheckpointError(f"checkpoint {self.dir} has no tensor {name!r}{hint}")
        return self.meta.tensors[name]

    def read_into(self, name: str, start: int, stop: int, out: torch.Tensor) -> None:
        """Elements ``[start, stop)`` of the flattened tensor ``name`` into ``out`` (any dtype, 1-D)."""
        saved = dtype_from_name(self.entry(name).dtype)
        direct = out.dtype == saved and out.is_contiguous() and out.device.type == "cpu"
        dest = out if direct else torch.empty(stop - start, dtype=saved)
        raw = as_bytes(dest)
        size = dest.element_size()
        filled = 0
        for p, m in self._index.get(name, []):
            lo, hi = max(p.start, start), min(p.stop, stop)
            if lo >= hi:
                continue
            read_exact(self.dir / m.data_file, m, p.offset + (lo - p.start) * size,
                       raw[(lo - start) * size:(hi - start) * size])
            filled += hi - lo
        if filled != stop - start:
            raise CheckpointError(f"{name}: checkpoint {self.dir} covers {filled} of elements [{start}, {stop})")
        if not direct:
            out.copy_(dest)

    def full(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        entry = self.entry(name)
        out = torch.empty(torch.Size(entry.shape).numel(), dtype=dtype or dtype_from_name(entry.dtype))
        self.read_into(name, 0, out.numel(), out)
        return out.view(entry.shape)

    def _verified(self, name: str, checksum: int) -> bytes:
        path = self.dir / name
        data = path.read_bytes()
        if zlib.crc32(data) != checksum:
            raise CheckpointError(f"{path} fails its checksum: the file is corrupted")
        return data

    def client(self) -> dict[str, Any]:
        data = self._verified(self.meta.client_file, self.meta.client_checksum)
        return torch.load(io.BytesIO(data), weights_only=False)

    def extra(self, rank: int) -> dict[str, Any]:
        m = self.manifests[rank]
        return torch.load(io.BytesIO(self._verified(m.extra_file, m.extra_checksum)), weights_only=False)


def consolidate(root: str | os.PathLike, tag: str | None = None, *, prefix: str = "optim/master/",
                dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor whose name starts with ``prefix``, whole, named without the prefix; no process
    group needed, whatever world size wrote the checkpoint."""
    reader = CheckpointReader(root, tag)
    names = [n for n in reader.names if n.startswith(prefix)]
    if not names:
        raise CheckpointError(f"checkpoint {reader.dir} has no tensors under {prefix!r} "
                              f"(it has e.g. {reader.names[:3]})")
    return {n[len(prefix):]: reader.full(n, dtype) for n in names}


def export(root: str | os.PathLike, out: str | os.PathLike, tag: str | None = None, *,
           prefix: str = "optim/master/", dtype: torch.dtype = torch.float32) -> Path:
    """Write one ``state_dict`` file that plain ``torch.load`` reads (fp32 by default, or bf16): the
    consolidated ``prefix`` tensors of the checkpoint. Written atomically."""
    state = consolidate(root, tag, prefix=prefix, dtype=dtype)
    out = Path(out)
    tmp = out.with_name(out.name + f".partial-{secrets.token_hex(4)}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return out
