"""Asynchronous block file I/O into page-aligned tensors.

A request (read or write a whole buffer at an offset of one file) runs on a pool
thread as a sequence of ``block_bytes`` ``pread``/``pwrite`` calls, in file order;
requests for different files run on different threads at once, so a storage device
sees a queue of requests, each of them sequential (what storage, and a virtual disk's
read-ahead on its host, serve fastest; cutting one file's request across threads was
measured slower here). The threads release the GIL inside the system call. ``O_DIRECT`` skips the page cache
(no second copy of every byte, no eviction of the host memory training needs); it
needs the buffer address, the length and the offset to be multiples of the
logical block size, which :func:`aligned_empty` and the callers' padding provide.
Where the filesystem refuses ``O_DIRECT`` (tmpfs, some network filesystems) the
same calls go through the page cache.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

__all__ = ["ALIGN", "BlockIO", "IOHandle", "SwapIOError", "aligned_empty", "probe_direct"]

ALIGN = 4096  # page size: a multiple of every common logical block size


class SwapIOError(OSError):
    """Reading or writing a swap file failed; the message names the file."""


HUGE_PAGE = 2 << 20


def aligned_empty(nbytes: int, *, pin: bool = False) -> torch.Tensor:
    """A uint8 tensor of ``nbytes`` whose address is a multiple of :data:`ALIGN` (contents undefined).

    Unpinned buffers of at least a huge page are anonymous memory advised to use transparent
    huge pages: direct I/O pins every page of its buffer for each transfer, and into 4 KiB pages
    it measured up to 45% slower here than into huge pages (the same for plain code).
    ``pin``: page-locked by CUDA, for asynchronous copies to a GPU.
    """
    if not pin and nbytes >= HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE"):
        # private anonymous memory (a shared mapping would not get transparent huge pages);
        # the tensor keeps the mapping alive
        region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        raw = torch.frombuffer(region, dtype=torch.uint8)
        skip = (-raw.data_ptr()) % HUGE_PAGE
        with contextlib.suppress(OSError):  # a kernel without THP: 4 KiB pages, still correct
            region.madvise(mmap.MADV_HUGEPAGE, skip, nbytes)
        return raw[skip:skip + nbytes]
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=pin)
    skip = (-raw.data_ptr()) % ALIGN
    return raw[skip:skip + nbytes]


def probe_direct(directory: Path) -> bool:
    """Whether files in ``directory`` can be opened with ``O_DIRECT``."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    probe = directory / f".zero-direct-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | flag, 0o600)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return False
        raise
    try:
        buf = aligned_empty(ALIGN)
        os.pwritev(fd, [buf.numpy().data], 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


class IOHandle:
    """A request in flight: ``wait()`` returns when every block is done and raises the first error."""

    def __init__(self, futures: list[Future], fd: int, path: Path, on_done: Callable[[], None] | None = None):
        self._futures, self._fd, self.path = futures, fd, path
        self._on_done = on_done
        self._lock = threading.Lock()
        self._closed = False

    def done(self) -> bool:
        return all(f.done() for f in self._futures)

    def wait(self) -> None:
        error: BaseException | None = None
        for f in self._futures:
            exc = f.exception()
            if exc is not None and error is None:
                error = exc
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._fd)
                if error is None and self._on_done is not None:
                    self._on_done()
        if error is not None:
            raise error


class BlockIO:
    """A pool of I/O threads reading and writing whole buffers, ``block_bytes`` per system call."""

    def __init__(self, *, threads: int = 4, block_bytes: int = 8 << 20, direct: bool = True):
        if threads < 1:
            raise ValueError(f"I/O threads must be >= 1, got {threads}")
        if block_bytes < ALIGN or block_bytes % ALIGN:
            raise ValueError(f"block_bytes must be a positive multiple of {ALIGN}, got {block_bytes}")
        self.block_bytes, self.direct = block_bytes, direct
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="zero-offload-io")

    def _open(self, path: Path, write: bool) -> int:
        flags = (os.O_RDWR | os.O_CREAT) if write else os.O_RDONLY
        if self.direct:
            flags |= os.O_DIRECT
        try:
            return os.open(path, flags, 0o600)
        except OSError as exc:
            raise SwapIOError(exc.errno, f"cannot open swap file {path}: {exc.strerror}") from exc

    def submit(self, path: Path, buffer: torch.Tensor, *, write: bool, offset: int = 0,
               on_done: Callable[[], None] | None = None) -> IOHandle:
        """Read ``path`` into ``buffer`` (uint8, aligned) or write ``buffer`` to it, starting at ``offset``."""
        if self.direct and (buffer.data_ptr() % ALIGN or buffer.numel() % ALIGN or offset % ALIGN):
            raise ValueError(f"O_DIRECT I/O needs a {ALIGN}-byte aligned buffer, length and offset "
                             f"(address {buffer.data_ptr():#x}, {buffer.numel()} bytes, offset {offset})")
        fd = self._open(path, write)
        view = buffer.numpy().data
        return IOHandle([self._pool.submit(self._run, fd, view, offset, write, path)], fd, path, on_done)

    def _run(self, fd: int, view: memoryview, offset: int, write: bool, path: Path) -> None:
        for start in range(0, len(view), self.block_bytes):
            _transfer(fd, view[start:start + self.block_bytes], offset + start, write, path)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


def _transfer(fd: int, block: memoryview, offset: int, write: bool, path: Path) -> None:
    done, size = 0, len(block)
    while done < size:
        try:
            n = (os.pwritev if write else os.preadv)(fd, [block[done:]], offset + done)
        except OSError as exc:
            what = "write" if write else "read"
            raise SwapIOError(exc.errno, f"{what} of swap file {path} failed at byte {offset + done}: "
                                         f"{exc.strerror}") from exc
        if n == 0:
            raise SwapIOError(errno.EIO, f"swap file {path} ended at byte {offset + done}; {size - done} more "
                                         "bytes were expected (was it truncated or replaced?)")
        done += n
