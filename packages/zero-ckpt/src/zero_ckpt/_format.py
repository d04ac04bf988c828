"""The on-disk format: one data file and one manifest per rank, checksummed in fixed blocks.

A rank's data file is its pieces end to end (raw bytes, native byte order). Its
manifest (msgspec, JSON) lists each piece -- tensor name, the range of the
flattened tensor it holds, its dtype and where its bytes start in the file --
and a CRC-32 of every ``block_size`` bytes of the file, so a reader can verify
exactly the blocks it reads, even when resharding makes it read only part of a
piece. ``meta.json`` names every tensor with its global shape and dtype, the
world size that wrote it, the step and each rank's files, with a CRC-32 of each
rank's manifest and of ``client.pt``; its own CRC-32 is its last field, taken over
its encoding with that field zero (``_verify`` checks all of them and every piece
against the data file before a byte is used).
"""

from __future__ import annotations

import ctypes
import os
import threading
import zlib
from pathlib import Path

import msgspec
import torch

__all__ = ["BLOCK", "CheckpointError", "CheckpointMeta", "PieceEntry", "RankManifest", "TensorEntry",
           "dtype_from_name", "dtype_name", "read_exact", "write_file"]

FORMAT_VERSION = 2  # 2: meta.json checksums the manifests and itself
READABLE_VERSIONS = (1, 2)
BLOCK = 4 << 20


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read: names the file, tensor or setting at fault."""


class PieceEntry(msgspec.Struct, frozen=True):
    name: str
    start: int  # elements of the flattened tensor: [start, stop)
    stop: int
    dtype: str
    offset: int  # byte offset in the rank's data file


class RankManifest(msgspec.Struct, frozen=True):
    rank: int
    data_file: str
    size: int  # bytes
    block_size: int
    checksums: list[int]  # CRC-32 of each block of the data file
    pieces: list[PieceEntry]
    extra_file: str = ""  # this rank's RNG states (torch.save of tensors and plain data)
    extra_checksum: int = 0


class TensorEntry(msgspec.Struct, frozen=True):
    shape: list[int]
    dtype: str


class CheckpointMeta(msgspec.Struct, frozen=True):
    format_version: int
    tag: str
    world_size: int
    tensors: dict[str, TensorEntry]
    ranks: list[str]  # manifest file of each rank
    client_file: str = ""
    client_checksum: int = 0
    manifest_checksums: list[int] = msgspec.field(default_factory=list)  # CRC-32 of each file in ``ranks``
    checksum: int = 0  # CRC-32 of this meta encoded with checksum 0 (format 2 on)


_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool)}


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise CheckpointError(f"cannot checkpoint tensors of dtype {dtype}")
    return name


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise CheckpointError(f"unknown dtype {name!r} in checkpoint") from None


def as_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor as a writable buffer, without a copy (and without numpy,
    which zero-ckpt does not depend on). The buffer keeps the tensor alive."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("as_bytes needs a contiguous CPU tensor")
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return memoryview(bytearray(0))
    buf = (ctypes.c_char * nbytes).from_address(t.data_ptr())
    buf._tensor = t  # type: ignore[attr-defined]
    return memoryview(buf).cast("B")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _block_checksums(chunks: list[memoryview], block: int) -> list[int]:
    sums: list[int] = []
    crc, filled = 0, 0
    for chunk in chunks:
        pos = 0
        while pos < len(chunk):
            take = min(block - filled, len(chunk) - pos)
            crc = zlib.crc32(chunk[pos:pos + take], crc)
            filled += take
            pos += take
            if filled == block:
                sums.append(crc)
                crc, filled = 0, 0
    if filled:
        sums.append(crc)
    return sums


def write_file(path: Path, chunks: list[memoryview], block: int = BLOCK, sync: bool = True) -> tuple[int, list[int]]:
    """Write ``chunks`` end to end to a new file and fsync it (unless ``sync`` is False: a marker that
    only signals); returns (size, block checksums). The checksums are computed from memory while the
    fsync waits on the storage (both release the GIL), so they cost almost nothing on top."""
    with open(path, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
        f.flush()
        syncing = threading.Thread(target=os.fsync, args=(f.fileno(),)) if sync else None
        if syncing is not None:
            syncing.start()
        sums = _block_checksums(chunks, block)
        if syncing is not None:
            syncing.join()
    return sum(len(c) for c in chunks), sums


def read_exact(path: Path, manifest: RankManifest, start: int, out: memoryview) -> None:
    """Read ``len(out)`` bytes at ``start`` of a rank's data file into ``out``, verifying every block
    they touch; a truncated or corrupted file raises CheckpointError naming it."""
    stop = start + len(out)
    if stop > manifest.size:
        raise CheckpointError(f"{path}: manifest says {manifest.size} bytes, a piece ends at {stop}")
    b = manifest.block_size
    first, last = start // b, (stop - 1) // b if stop > start else start // b - 1
    try:
        f = open(path, "rb")  # noqa: SIM115 -- closed by the with below; its error is ours to name
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot open checkpoint data ({exc})") from exc
    with f:
        actual = os.fstat(f.fileno()).st_size
        if actual != manifest.size:
            raise CheckpointError(f"{path} is {actual} bytes; its manifest says {manifest.size} "
                                  "(truncated or overwritten)")
        for k in range(first, last + 1):
            lo, hi = k * b, min((k + 1) * b, manifest.size)
            inner_lo, inner_hi = max(lo, start), min(hi, stop)
            if inner_lo == lo and inner_hi == hi:  # the whole block is wanted: read it in place
                view = out[lo - start:hi - start]
                f.seek(lo)
                got = f.readinto(view)
                if got != hi - lo or zlib.crc32(view) != manifest.checksums[k]:
                    raise CheckpointError(f"{path}: block {k} (bytes {lo}-{hi}) fails its checksum: the file "
                                          "is corrupted")
            else:
                buf = bytearray(hi - lo)
                f.seek(lo)
                got = f.readinto(buf)
                if got != hi - lo or zlib.crc32(buf) != manifest.checksums[k]:
                    raise CheckpointError(f"{path}: block {k} (bytes {lo}-{hi}) fails its checksum: the file "
                                          "is corrupted")
                out[inner_lo - start:inner_hi - start] = memoryview(buf)[inner_lo - lo:inner_hi - lo]


def checksum_file(path: Path) -> int:
    with open(path, "rb") as f:
        return zlib.crc32(f.read())
