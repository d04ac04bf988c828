"""NVMeStore: named flat tensors in files, streamed through a bounded pool of host buffers.

ZeRO-Infinity's tier below host memory. Each key is one file in a private swap
directory under the path given; :class:`~zero_offload._swapper.Swapper` decides
what is in host memory. The store satisfies zero-optim's ``StateStore`` protocol
structurally: ``create`` (write the first value), ``get`` (borrow the tensor, read
ahead if it was prefetched), ``put`` (write it back, asynchronously) or ``release``
(drop a read-only borrow), ``prefetch`` (the order keys will be used), ``flush``,
``reserve`` (refuse, before anything is written, bytes the disk cannot hold).

The swap directory is removed by :meth:`close`, when the store is garbage
collected, and at interpreter exit -- also when training ended in an error. A
process that cannot clean up (SIGKILLed, out of memory) leaves its directory
behind; each store holds an advisory lock on a file in its own directory for its
whole life, so the next store opened under the same path, or any store closing
there, removes the directories whose owner is gone (the kernel dropped its lock);
``zero run`` does it too once all its ranks have exited.
The path is created, as DeepSpeed does, when it does not exist.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import logging
import os
import re
import shutil
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

import torch

from ._io import BlockIO, SwapIOError, probe_direct
from ._swapper import Swapper, SwapStats, _Entry, human_bytes, padded

__all__ = ["NVMeStore", "StoreHandle"]

T = TypeVar("T")
logger = logging.getLogger("zero_offload")
OWNER = ".owner.lock"  # in each swap directory, locked (flock) by the store's process while it lives


class StoreHandle(Generic[T]):
    """An operation under way in a store; ``wait()`` finishes it (once) and returns its result."""

    def __init__(self, finish: Callable[[], T]):
        self._finish: Callable[[], T] | None = finish
        self._result: T | None = None

    def wait(self) -> T:
        if self._finish is not None:
            self._result, self._finish = self._finish(), None
        return self._result  # type: ignore[return-value]


def _allocate(path: Path, nbytes: int) -> None:
    """Give the file all its blocks now, in one piece where the filesystem can: a file whose
    extents were handed out write by write (interleaved with other files) reads back slower."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a filesystem without fallocate: write as we go
            raise SwapIOError(exc.errno, f"cannot allocate {nbytes} bytes for swap file {path}: {exc.strerror}") \
                from exc
    finally:
        os.close(fd)


def _cleanup(directory: Path, io: BlockIO, swap: Swapper, owner: int) -> None:
    with contextlib.suppress(Exception):  # cleaning up after a failure: the files go regardless
        swap.free_all()  # every request finished (and its file closed) before the files go
    io.shutdown()
    shutil.rmtree(directory, ignore_errors=True)
    os.close(owner)
    sweep_orphans(directory.parent)


def _lock_owner(directory: Path) -> int:
    """Mark ``directory`` as this live process's: a lock the kernel drops when the process dies.

    The lock file is locked under a private name and only then renamed into place, so another
    rank's :func:`sweep_orphans` never sees it unlocked (it would take the lock, and the directory)."""
    staged = directory / (OWNER + ".new")
    fd = os.open(staged, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, str(os.getpid()).encode())
        os.rename(staged, directory / OWNER)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _register(root: Path, directory: Path) -> None:
    """Where a supervisor asks (``ZERO_SWAP_REGISTRY``, set by ``zero run``), record the path this store
    works under, so that once every rank has exited it can remove what a killed rank left there."""
    registry = os.environ.get("ZERO_SWAP_REGISTRY")
    if registry:
        with contextlib.suppress(OSError):
            Path(registry).mkdir(parents=True, exist_ok=True)
            (Path(registry) / f"{os.getpid()}-{directory.name}").write_text(str(root.resolve()))


def sweep_orphans(root: Path) -> list[Path]:
    """Remove the swap directories under ``root`` whose store's process is gone (its lock is free);
    return them. A directory whose lock is held belongs to a live store and is left alone."""
    removed = []
    for directory in root.glob("zero-swap-*"):
        try:
            fd = os.open(directory / OWNER, os.O_RDWR)
        except OSError:  # no lock file: not a store's (or one being created this instant)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # held: its store is alive
            continue
        if os.fstat(fd).st_nlink == 0:  # its store closed between our open and our lock: nothing is left
            os.close(fd)
            continue
        try:
            pid = os.read(fd, 32).decode(errors="replace")
            shutil.rmtree(directory, ignore_errors=True)
        finally:
            os.close(fd)
        removed.append(directory)
        logger.warning(f"removed swap files left by a store whose process (pid {pid or '?'}) died: {directory}")
    return removed


class NVMeStore:
    """Flat tensors kept in files under ``path``, at most ``buffer_bytes`` of them in host memory.

    Args:
        path: an existing, writable directory on the fast disk; the store works in a
            fresh ``zero-swap-*`` directory inside it.
        buffer_bytes: the host-memory budget for buffers (reads ahead, borrowed
            tensors, writes in flight). It must hold the largest set of keys a caller
            borrows at once (an optimizer step holds a shard's weights and states).
        io_threads: requests (each a different file, read or written sequentially) in
            flight at once. One measured best on this repository's virtual disk, which
            serves a single sequential stream fastest; a local NVMe drive, which needs a
            queue of requests to reach its bandwidth, wants 4 to 8.
        block_bytes: bytes per system call.
        direct: ``O_DIRECT`` (page cache bypassed); ``None`` uses it where the
            filesystem allows it.
        pin: page-lock the buffers (default: when CUDA is available), so copies to
            the GPU are asynchronous.
    """

    def __init__(self, path: str | os.PathLike[str], *, buffer_bytes: int = 1 << 30, io_threads: int = 1,
                 block_bytes: int = 8 << 20, direct: bool | None = None, pin: bool | None = None):
        root = Path(path)
        if not root.exists():
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise PermissionError(exc.errno, f"NVMe offload path {root} does not exist and cannot be created: "
                                                 f"{exc.strerror}", str(root)) from exc
            logger.info(f"created the NVMe offload path {root}")
        if not root.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"NVMe offload path {root} is not a directory", str(root))
        if not os.access(root, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, f"NVMe offload path {root} is not writable", str(root))
        if buffer_bytes < 1:
            raise ValueError(f"buffer_bytes must be positive, got {buffer_bytes}")
        self.root = root
        try:
            self.directory = Path(tempfile.mkdtemp(prefix="zero-swap-", dir=root))
        except OSError as exc:
            raise PermissionError(exc.errno, f"NVMe offload path {root} is not writable: {exc.strerror}",
                                  str(root)) from exc
        try:
            owner = _lock_owner(self.directory)
        except OSError as exc:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise PermissionError(exc.errno, f"NVMe offload path {root} is not writable: {exc.strerror}",
                                  str(root)) from exc
        sweep_orphans(root)
        _register(root, self.directory)
        try:
            supported = probe_direct(self.directory)
            if direct and not supported:
                raise OSError(errno.EINVAL, f"the filesystem of {root} does not support O_DIRECT (direct=True)")
            self.direct = supported if direct is None else direct
            self._io = BlockIO(threads=io_threads, block_bytes=block_bytes, direct=self.direct)
        except BaseException:
            shutil.rmtree(self.directory, ignore_errors=True)
            os.close(owner)
            raise
        pin = torch.cuda.is_available() if pin is None else pin
        self._swap = Swapper(self._io, buffer_bytes, pin)
        self._finalizer = weakref.finalize(self, _cleanup, self.directory, self._io, self._swap,
                                          owner)
        self._reserved = 0  # bytes promised by reserve() and not yet created
        self._file_ids = itertools.count()
        self.device = torch.device("cpu")

    # -- StateStore ---------------------------------------------------------------------------
    def reserve(self, nbytes: int) -> None:
        """Check, before anything is written, that ``nbytes`` more of state fit on the disk."""
        self._check_open()
        free = shutil.disk_usage(self.directory).free
        if self._reserved + nbytes > free:
            raise OSError(errno.ENOSPC, f"NVMe offload path {self.root} has {human_bytes(free)} free; the offloaded "
                                        f"state needs {human_bytes(self._reserved + nbytes)}")
        self._reserved += nbytes

    def create(self, key: str, value: torch.Tensor) -> None:
        self._check_open()
        if key in self._swap.entries:
            raise KeyError(f"state {key!r} already exists")
        nbytes = padded(value.numel() * value.element_size())
        if self._reserved >= nbytes:
            self._reserved -= nbytes
        else:
            self.reserve(nbytes)
            self._reserved -= nbytes
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", key)[:100]
        path = self.directory / f"{next(self._file_ids):06d}-{name}.swp"  # unique, also after a delete
        _allocate(path, nbytes)
        self._swap.entries[key] = _Entry(key, path, value.dtype, value.numel(), nbytes)
        try:
            self._swap.put(key, value.detach())
        except BaseException:  # no buffer for it, or the write could not start: no half-made key
            self._swap.delete(key)
            raise

    def get(self, key: str) -> torch.Tensor:
        self._check_open()
        return self._swap.get(key)

    def put(self, key: str, value: torch.Tensor) -> None:
        self._check_open()
        self._swap.put(key, value)

    def release(self, key: str) -> None:
        self._check_open()
        self._swap.release(key)

    def prefetch(self, keys: list[str]) -> None:
        self._check_open()
        self._swap.prefetch(keys)

    def flush(self) -> None:
        self._check_open()
        self._swap.flush()

    def delete(self, key: str) -> None:
        """Remove ``key`` and its file (its buffer goes back to the pool); refused while it is borrowed."""
        self._check_open()
        self._swap.delete(key)

    def get_async(self, key: str) -> StoreHandle[torch.Tensor]:
        """Start reading ``key`` (within the budget, after what is already queued); ``wait()`` borrows
        it, as ``get`` does."""
        self._swap.enqueue(key)
        return StoreHandle(lambda: self._swap.get(key))

    def put_async(self, key: str, value: torch.Tensor) -> StoreHandle[None]:
        """``put``, with a handle whose ``wait()`` returns once this key's write is on disk."""
        self._swap.put(key, value)
        return StoreHandle(lambda: self._swap.wait_write(key))

    def keys(self) -> list[str]:
        return list(self._swap.entries)

    # -- the rest -----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if not self._finalizer.alive:
            raise RuntimeError(f"this NVMeStore was closed (its swap files in {self.directory} are gone)")

    @property
    def stats(self) -> SwapStats:
        return self._swap.stats

    @property
    def buffer_bytes(self) -> int:
        return self._swap.budget

    def drop_cache(self) -> None:
        """Finish all I/O and forget what is cached: the next ``get`` of a key not borrowed reads its
        file. (The buffers stay allocated, within the budget, for reuse; ``close`` frees them.)"""
        self._check_open()
        self._swap.forget()

    def nbytes(self) -> int:
        """Bytes of all swap files."""
        return sum(e.nbytes for e in self._swap.entries.values())

    def close(self) -> None:
        """Finish all I/O, free the buffers, remove the swap files (a write that failed is lost:
        ``flush`` first to see it)."""
        self._finalizer()

    def __enter__(self) -> NVMeStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "O_DIRECT" if self.direct else "buffered"
        return (f"NVMeStore({str(self.directory)!r}, {len(self._swap.entries)} keys, "
                f"{self.nbytes() / 2**20:.1f} MiB on disk, buffers {self.buffer_bytes / 2**20:.0f} MiB, {mode})")
