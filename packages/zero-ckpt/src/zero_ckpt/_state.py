"""State checkpoints: every rank writes its shards; any number of ranks reads them back.

A checkpoint is a directory ``<root>/<tag>/`` with a data file and a manifest per
rank and one ``meta.json``. It is written under ``<root>/<tag>.partial-<nonce>/``,
each file fsynced, and renamed into place by rank 0 only once every rank's files
are durable; only then does ``<root>/latest`` (replaced atomically) name it. A
crash at any point leaves the previous checkpoint loadable and ``latest`` on it.

What is saved are *sharded states*: mappings of names to tensors that give a
global shape and dtype and the pieces (ranges of the flattened tensor) this rank
holds -- zero-optim's ``sharded_state()`` is one. Loading fills the pieces of the
loading ranks' sharded states in place, whatever ranges they hold: resharding
from N ranks to M, or across ZeRO stages, is the normal path. An object with
``sharded_state()``, ``checkpoint_meta()`` and ``load_checkpoint_meta()`` (a ZeRO
optimizer) also gets its counters back and refreshes the model from what was loaded.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import msgspec
import torch

from zero_comm import Communicator

from ._exchange import exchange, subtract
from ._format import (
    BLOCK,
    FORMAT_VERSION,
    CheckpointError,
    CheckpointMeta,
    PieceEntry,
    RankManifest,
    TensorEntry,
    as_bytes,
    checksum_file,
    dtype_name,
    fsync_dir,
    write_file,
)
from ._items import Checkpointable, ShardedTensorLike, _items_state
from ._load import Items, PreparedLoad, prepare_load
from ._reader import CheckpointReader
from ._rng import process_rng_state
from ._verify import safe_load, seal_meta

__all__ = ["CheckpointManager"]


class _Plan(msgspec.Struct):
    nonce: str
    tensors: dict[str, TensorEntry]
    pieces: list[tuple[str, int, int]]


class CheckpointManager:
    """Saves and loads checkpoints under ``root`` for the ranks of ``comm``.

    ``save(tag, items, client_state=..., async_save=...)`` and ``load(items, tag=None)``;
    ``items`` maps a name to a sharded state or a :class:`Checkpointable`. Every rank
    must call both. An async save copies the state to host memory and returns; a
    background thread writes it, and the next save, ``wait()`` or the interpreter's
    exit waits for it. ``timeout`` bounds how long rank 0 waits for the other ranks'
    files before it gives up on committing (the partial checkpoint is never used).
    """

    def __init__(self, root: str | os.PathLike, comm: Communicator, *, timeout: float = 600.0,
                 block_size: int = BLOCK):
        self.root, self.comm, self.timeout, self.block_size = Path(root), comm, timeout, block_size
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_save_blocked_s = 0.0  # how long the last save held up its caller ...
        self.last_step_wait_s = 0.0  # ... and the next optimizer step, waiting for the copy (async)
        self._staging: torch.Tensor | None = None  # host memory async saves copy into, reused
        self._pending_copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        atexit.register(self.wait)

    # -- saving ----------------------------------------------------------------------------
    def save(self, tag: str, items: Mapping[str, Any], *, client_state: Any = None, async_save: bool = False,
             overwrite: bool = False, update_latest: bool = True) -> None:
        began = time.perf_counter()
        try:
            self.wait()
            previous_error = ""
        except CheckpointError as exc:  # told to every rank in _agree, so none is left waiting for this one
            previous_error = f"rank {self.comm.rank}: {exc}"
        if not tag or "/" in tag or tag.startswith(".") or tag == "latest" or ".partial-" in tag:
            raise CheckpointError(f"bad checkpoint tag {tag!r}: use a plain name such as 'step100'")
        state = _items_state(items)
        metas = {k: v.checkpoint_meta() for k, v in items.items() if isinstance(v, Checkpointable)}
        # items that announce their changes (an optimizer's step pre-hook) are copied off the caller's time
        guarded = {k for k, v in items.items() if callable(getattr(v, "register_step_pre_hook", None))}
        mine = self._collect(state)
        plans = self._agree(tag, state, mine, overwrite, previous_error)
        nonce = plans[0].nonce
        writes = self._dedupe(plans, mine)
        partial = self.root / f"{tag}.partial-{nonce}"
        partial.mkdir(parents=True, exist_ok=True)
        if async_save:
            later = [w for w in writes if w[0].split("/", 1)[0] in guarded]
            writes = self._stage([w for w in writes if w[0].split("/", 1)[0] not in guarded], later)
        else:
            writes = [(name, start, stop, data.detach().cpu().contiguous()) for name, start, stop, data in writes]
        extra = process_rng_state()
        client = {"client_state": client_state, "items": metas} if self.comm.rank == 0 else None
        job = self._writer(tag, partial, plans, writes, extra, client, update_latest)
        if async_save:
            copied = threading.Event()
            hooks: list[Any] = []

            def before_step(_: Any) -> None:  # the state may not change until the copy is done
                began = time.perf_counter()
                copied.wait()
                self.last_step_wait_s = time.perf_counter() - began
                for h in hooks:
                    h.remove()

            hooks.extend(items[k].register_step_pre_hook(before_step) for k in guarded)
            self._thread = threading.Thread(target=self._run, args=(job, copied), name=f"zero-ckpt save {tag}",
                                            daemon=False)
            self._thread.start()
            self.last_save_blocked_s = time.perf_counter() - began
            return
        error: BaseException | None = None
        try:
            job(commit=False)  # every rank's files, durable ...
        except BaseException as exc:
            error = exc
        failures = self._failures(error)
        if not failures and self.comm.rank == 0:
            try:  # ... then, only if every rank's are, rank 0 commits them
                self._commit(tag, partial, plans, self.comm.world_size, client or {}, update_latest)
            except BaseException as exc:
                error = exc
        failures = failures or self._failures(error)  # rank 0's commit
        if failures:
            if self.comm.rank == 0:  # every rank is done with it: free its space now, not at the next save
                shutil.rmtree(partial, ignore_errors=True)
            raise CheckpointError(f"checkpoint {tag} was not saved ({'; '.join(failures)}); "
                                  f"{self.root / 'latest'} still names the previous one") from error
        self.last_save_blocked_s = time.perf_counter() - began

    def _failures(self, error: BaseException | None) -> list[str]:
        """Every rank's error, on every rank (collective)."""
        told = exchange(self.comm, (str(error) or type(error).__name__).encode() if error is not None else b"")
        return [f"rank {r}: {m.decode(errors='replace')}" for r, m in enumerate(told) if m]

    def _collect(self, state: Mapping[str, ShardedTensorLike]) -> list[tuple[str, int, int, torch.Tensor]]:
        mine = []
        for name, entry in state.items():
            numel = torch.Size(entry.global_shape).numel()
            for piece in entry.pieces:
                data = piece.data
                if not (0 <= piece.start <= piece.stop <= numel) or data.numel() != piece.stop - piece.start:
                    raise CheckpointError(f"{name}: a piece [{piece.start}, {piece.stop}) of {data.numel()} "
                                          f"elements does not fit a tensor of {numel} elements")
                if data.dtype != entry.dtype:
                    raise CheckpointError(f"{name}: a piece is {data.dtype}, the tensor {entry.dtype}")
                mine.append((name, piece.start, piece.stop, data.reshape(-1)))
        return mine

    def _agree(self, tag: str, state: Mapping[str, ShardedTensorLike], mine: list,
               overwrite: bool, problem: str = "") -> list[_Plan]:
        """Share every rank's tensors and pieces; check they fit together before anything is written."""
        if self.comm.rank == 0 and not problem:
            problem = self._prepare_root(tag, overwrite, sum(d.numel() * d.element_size() for *_, d in mine))
        plan = _Plan(secrets.token_hex(4) if self.comm.rank == 0 else "",
                     {n: TensorEntry(list(e.global_shape), dtype_name(e.dtype)) for n, e in state.items()},
                     [(n, s, e) for n, s, e, _ in mine])
        raw = exchange(self.comm, msgspec.json.encode([problem, plan]))
        decoded = [msgspec.json.decode(r, type=tuple[str, _Plan]) for r in raw]
        problems = [p for p, _ in decoded if p]
        if problems:
            raise CheckpointError("; ".join(problems))
        plans = [p for _, p in decoded]
        tensors: dict[str, TensorEntry] = {}  # a rank lists only the tensors it holds part of
        for r, p in enumerate(plans):
            for name, entry in p.tensors.items():
                if tensors.setdefault(name, entry) != entry:
                    raise CheckpointError(f"{name}: rank {r} saves it as {entry.shape} {entry.dtype}, another rank "
                                          f"as {tensors[name].shape} {tensors[name].dtype}: every rank must save "
                                          "the same items of the same model")
        plans[0].tensors = tensors
        for name, entry in tensors.items():
            numel = torch.Size(entry.shape).numel()
            ranges = sorted((s, e) for p in plans for n, s, e in p.pieces if n == name)
            if subtract([(0, numel)], ranges):
                gap = subtract([(0, numel)], ranges)[0]
                raise CheckpointError(f"{name}: no rank holds elements [{gap[0]}, {gap[1]}) of it")
        return plans

    def _prepare_root(self, tag: str, overwrite: bool, nbytes: int) -> str:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            return f"cannot write checkpoints to {self.root}: {exc}"
        if (self.root / tag).exists() and not overwrite:
            return f"checkpoint {self.root / tag} exists; pass overwrite=True or use a new tag"
        for stale in self.root.glob("*.partial-*"):  # left by a save that never committed
            tag_of, _, kind = stale.name.partition(".partial-")
            if kind.startswith("old-") and not (self.root / tag_of).exists():
                os.rename(stale, self.root / tag_of)  # an overwrite died between its two renames: undo it
            elif stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        free = shutil.disk_usage(self.root).free
        need = nbytes * self.comm.world_size  # a rank's share, taken as typical
        if free < need:
            return (f"no space for checkpoint {tag}: {self.root} has {_mib(free)} free and it needs about {_mib(need)} "
                    "(free some space or save elsewhere)")
        return ""

    def _dedupe(self, plans: list[_Plan], mine: list) -> list[tuple[str, int, int, torch.Tensor]]:
        """Where lower ranks hold the same elements (replicated state), only the lowest writes them."""
        r = self.comm.rank
        covered: dict[str, list[tuple[int, int]]] = {}
        for p in plans[:r]:
            for n, s, e in p.pieces:
                covered.setdefault(n, []).append((s, e))
        out = []
        for name, start, stop, data in mine:
            for s, e in subtract([(start, stop)], covered.get(name, [])):
                out.append((name, s, e, data[s - start:e - start]))
            covered.setdefault(name, []).append((start, stop))
        return out

    def _writer(self, tag: str, partial: Path, plans: list[_Plan], writes: list, extra: bytes,
                client: dict | None, update_latest: bool) -> Callable[..., None]:
        rank, world, block = self.comm.rank, self.comm.world_size, self.block_size

        def job(commit: bool = True) -> None:
            try:
                write()
            except BaseException as exc:
                with contextlib.suppress(OSError):  # best effort (the disk may be full): rank 0 stops waiting
                    (partial / f"failed.{rank}").write_text(str(exc) or type(exc).__name__)
                raise
            if rank == 0 and commit:
                assert client is not None
                self._commit(tag, partial, plans, world, client, update_latest)

        def write() -> None:
            data_file, extra_file = f"rank{rank:05d}.data", f"rank{rank:05d}.extra"
            pieces, chunks, offset = [], [], 0
            for name, start, stop, data in writes:
                pieces.append(PieceEntry(name, start, stop, dtype_name(data.dtype), offset))
                chunks.append(as_bytes(data))
                offset += chunks[-1].nbytes
            size, sums = write_file(partial / data_file, chunks, block)
            _, extra_sums = write_file(partial / extra_file, [memoryview(extra)], 1 << 62)
            manifest = RankManifest(rank, data_file, size, block, sums, pieces, extra_file, extra_sums[0])
            write_file(partial / f"rank{rank:05d}.json", [memoryview(msgspec.json.encode(manifest))])
            write_file(partial / f"done.{rank}", [memoryview(b"")], sync=False)  # a signal; the files are synced

        return job

    def _commit(self, tag: str, partial: Path, plans: list[_Plan], world: int, client: dict,
                update_latest: bool) -> None:
        buf = io.BytesIO()
        torch.save(client, buf)
        try:  # a load unpickles data only: refuse now what it would refuse then
            safe_load(buf.getvalue(), partial / "client.pt")
        except CheckpointError as exc:
            raise CheckpointError(f"client_state must hold only tensors and plain data (a load unpickles with "
                                  f"weights_only=True; torch.serialization.add_safe_globals allows more): {exc}"
                                  ) from None
        write_file(partial / "client.pt", [buf.getbuffer()])
        deadline = time.monotonic() + self.timeout
        while not all((partial / f"done.{r}").exists() for r in range(world)):
            if failed := sorted(partial.glob("failed.*")):
                raise CheckpointError("; ".join(f"rank {f.suffix[1:]} failed to write its files: "
                                                f"{f.read_text(errors='replace')}" for f in failed))
            if time.monotonic() > deadline:
                missing = [r for r in range(world) if not (partial / f"done.{r}").exists()]
                raise CheckpointError(f"checkpoint {tag}: ranks {missing} did not finish writing within "
                                      f"{self.timeout:.0f} s; {self.root / 'latest'} still names the previous one")
            time.sleep(0.01)
        manifests = [f"rank{r:05d}.json" for r in range(world)]
        meta = CheckpointMeta(FORMAT_VERSION, tag, world, plans[0].tensors, manifests, "client.pt",
                              checksum_file(partial / "client.pt"),
                              [checksum_file(partial / name) for name in manifests])
        write_file(partial / "meta.json", [memoryview(seal_meta(meta))])
        for r in range(world):
            (partial / f"done.{r}").unlink()
        fsync_dir(partial)
        final = self.root / tag
        old = None
        if final.exists():  # overwrite=True: move the old one aside, then the new one in
            old = self.root / f"{tag}.partial-old-{plans[0].nonce}"
            os.rename(final, old)
        os.rename(partial, final)
        fsync_dir(self.root)
        if update_latest:
            pointer = self.root / f"latest.partial-{plans[0].nonce}"
            write_file(pointer, [memoryview(tag.encode())])
            os.replace(pointer, self.root / "latest")
            fsync_dir(self.root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _stage(self, now: list, later: list) -> list:
        """Host copies of the pieces, in one buffer (pinned with CUDA) kept for the next async save: a fresh
        buffer would fault in every page again. ``now`` are copied before returning; ``later`` get their
        place and are copied by the background thread (their owner waits for it before changing them)."""
        writes = now + later
        sizes = [d.numel() * d.element_size() for *_, d in writes]
        total = sum(-(-s // 64) * 64 for s in sizes)
        if self._staging is None or self._staging.numel() < total:
            self._staging = torch.empty(total, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
        out, at = [], 0
        self._pending_copies = []
        for i, ((name, start, stop, data), size) in enumerate(zip(writes, sizes, strict=True)):
            host = self._staging[at:at + size].view(data.dtype)
            if i < len(now):
                host.copy_(data.detach().reshape(-1), non_blocking=True)
            else:
                self._pending_copies.append((host, data.detach().reshape(-1)))
            out.append((name, start, stop, host))
            at += -(-size // 64) * 64
        if any(d.device.type == "cuda" for *_, d in now):
            torch.cuda.synchronize()
        return out

    def _run(self, job: Callable[[], None], copied: threading.Event) -> None:
        try:
            try:
                for host, data in self._pending_copies:
                    host.copy_(data)
            finally:
                copied.set()
            job()
        except BaseException as exc:  # re-raised in the caller's thread by wait()
            self._error = exc

    def wait(self) -> None:
        """Wait for an async save of this rank to be durable (on rank 0: committed); re-raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"the background save failed: {error}") from error

    # -- loading ---------------------------------------------------------------------------
    def load(self, items: Mapping[str, Any], tag: str | None = None, *, restore_rng: bool = True) -> Any:
        """Fill ``items``' pieces from checkpoint ``tag`` (default: the one ``latest`` names), restore
        checkpointable items' counters and this rank's RNG, and return the client state. All or
        nothing: every rank verifies and stages first, and if any rank cannot, every rank raises the
        same CheckpointError and no state has changed (:func:`prepare`, then ``apply``)."""
        return self.prepare(items, tag, restore_rng=restore_rng).apply()

    def prepare(self, items: Items, tag: str | None = None, *, restore_rng: bool = True,
                check: Callable[[CheckpointReader, dict[str, Any]], None] | None = None) -> PreparedLoad:
        """The first half of :meth:`load` (collective): checkpoint ``tag`` verified and staged in host
        memory for ``items`` on every rank, or the same CheckpointError on every rank. ``check(reader,
        client)`` may raise to refuse the checkpoint on this rank; ``items`` may be a function of the opened
        checkpoint returning them. Nothing changes until ``apply()``."""
        return prepare_load(self, items, tag, restore_rng=restore_rng, check=check)


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"
