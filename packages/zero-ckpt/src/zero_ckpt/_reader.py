"""Reading checkpoints without a process group: any piece of any tensor, verified as it is read.

:class:`CheckpointReader` opens one checkpoint (``latest`` by default) and reads any
range of any tensor, from whichever ranks' files hold it, checking the CRC of every
block it touches. ``zero_ckpt._export`` builds whole tensors from it, whatever world
size wrote the checkpoint.
"""

from __future__ import annotations

import difflib
import glob
import os
import zlib
from pathlib import Path
from typing import Any

import torch

from ._format import (
    CheckpointError,
    PieceEntry,
    RankManifest,
    TensorEntry,
    as_bytes,
    dtype_from_name,
    read_exact,
)
from ._verify import check_coverage, open_manifest, open_meta, safe_load

__all__ = ["CheckpointReader", "latest_tag"]


def latest_tag(root: str | os.PathLike) -> str:
    """The tag ``<root>/latest`` names."""
    path = Path(root) / "latest"
    try:
        tag = path.read_text().strip()
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint in {root}: it has no 'latest' file") from None
    if "/" in tag or "\\" in tag or tag.startswith("."):
        raise CheckpointError(f"{path} names {tag!r}, which is not a tag in {root}")
    if tag and not (Path(root) / tag).exists():  # an overwrite died between its renames: the old copy
        aside = sorted(Path(root).glob(f"{tag}.partial-old-*"))
        if aside and (aside[0] / "meta.json").is_file():
            return aside[0].name
    if not tag or not (Path(root) / tag / "meta.json").is_file():
        raise CheckpointError(f"{path} names {tag!r}, which is not a complete checkpoint in {root}")
    return tag


class CheckpointReader:
    """Reads one checkpoint, piece by piece, without a process group. Opening it verifies
    ``meta.json`` and every rank's manifest (checksums, and every piece against its data file's
    size: see ``_verify``); reading verifies the CRC of every block it touches."""

    def __init__(self, root: str | os.PathLike, tag: str | None = None):
        self.root = Path(root)
        self.tag = tag or latest_tag(self.root)
        self.dir = self.root / self.tag
        if tag and not self.dir.exists():  # an overwrite of this tag died between its two renames
            aside = sorted(self.root.glob(f"{glob.escape(tag)}.partial-old-*"))
            if aside and (aside[0] / "meta.json").is_file():
                self.tag, self.dir = aside[0].name, aside[0]
        self.meta = open_meta(self.dir / "meta.json")
        self.manifests = [open_manifest(self.dir, self.meta, r) for r in range(len(self.meta.ranks))]
        check_coverage(self.dir, self.meta, self.manifests)
        self._index: dict[str, list[tuple[PieceEntry, RankManifest]]] = {}
        for m in self.manifests:
            for p in m.pieces:
                self._index.setdefault(p.name, []).append((p, m))

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
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CheckpointError(f"{path} is missing or unreadable: {self.dir} is not a complete checkpoint "
                                  f"({exc.strerror or exc})") from None
        if zlib.crc32(data) != checksum:
            raise CheckpointError(f"{path} fails its checksum: the file is corrupted")
        return data

    def client(self) -> dict[str, Any]:
        """The client state and the items' counters (tensors and plain data only)."""
        if not self.meta.client_file:
            raise CheckpointError(f"{self.dir / 'meta.json'} names no client state file")
        path = self.dir / self.meta.client_file
        client = safe_load(self._verified(self.meta.client_file, self.meta.client_checksum), path)
        if not isinstance(client, dict) or not isinstance(client.get("items"), dict) or "client_state" not in client:
            raise CheckpointError(f"{path} does not hold a client state and items' counters")
        return client

    def extra(self, rank: int) -> dict[str, Any]:
        """Rank ``rank``'s RNG states (tensors and plain data only)."""
        m = self.manifests[rank]
        if not m.extra_file:
            raise CheckpointError(f"{self.dir / self.meta.ranks[rank]} names no RNG state file for rank {rank}")
        path = self.dir / m.extra_file
        extra = safe_load(self._verified(m.extra_file, m.extra_checksum), path)
        if not isinstance(extra, dict) or not isinstance(extra.get("torch"), torch.Tensor) or "python" not in extra:
            raise CheckpointError(f"{path} does not hold RNG states")
        return extra
