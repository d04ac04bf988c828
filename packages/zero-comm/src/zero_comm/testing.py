"""Run a function on N real ranks, from a test.

:func:`run_ranks` spawns ``world_size`` fresh Python processes, joins them into
a Gloo world through a store the caller hosts (so there is no free-port race),
runs ``fn(*args, **kwargs)`` on each and returns the per-rank results in rank
order. Every distributed test in zero goes through it::

    def check_sum():
        comm = zero_comm.init_distributed()        # already initialised: returns the world
        t = torch.tensor([comm.rank + 1.0])
        comm.all_reduce(t)
        return t.item()

    def test_sum():
        assert run_ranks(check_sum, 4) == [10.0] * 4

Failures are loud and bounded: an exception on any rank raises
:class:`RankFailure` naming the rank with its traceback; a rank that dies (a
signal, ``os._exit``) is reported with its exit signal; once one rank has
failed the others get ``grace`` seconds to fail or finish before they are
killed; past ``timeout`` every rank is killed and :class:`RankTimeout` names
the ranks that were still running. No process outlives the call.

``fn`` must be importable by name (a module-level function), because ranks are
started with the ``spawn`` method, as CUDA requires.
"""

from __future__ import annotations

import gc
import io
import multiprocessing as mp
import os
import queue
import signal
import time
import traceback
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ._communicator import CommError
from ._launch import init_distributed

__all__ = ["WORLD_SIZES", "RankFailure", "RankReport", "RankTimeout", "live_tensor_bytes", "run_ranks"]

WORLD_SIZES = (1, 2, 4)
"""The world sizes every distributed feature is tested at."""


@dataclass(frozen=True)
class RankReport:
    """How one rank ended."""

    rank: int
    outcome: str  # "ok", "raised", "died", "killed", "timeout"
    detail: str = ""
    secondary: bool = False  # a consequence of another rank's failure (a failed collective)
    value: Any = None  # what fn returned, for "ok"

    def describe(self) -> str:
        return f"rank {self.rank} {self.outcome}" + (f":\n{self.detail}" if self.detail else "")


class RankFailure(RuntimeError):
    """One or more ranks failed; ``reports`` says how each rank ended, causes first."""

    def __init__(self, message: str, reports: list[RankReport], pids: list[int]):
        super().__init__(message)
        self.reports = reports
        self.pids = pids

    @property
    def failed_ranks(self) -> list[int]:
        return [r.rank for r in self.reports if r.outcome != "ok"]


class RankTimeout(RankFailure):
    """The ranks did not all finish within the timeout."""


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0,
              grace: float = 10.0, backend: str = "gloo", collective_timeout: float = 60.0,
              env: Mapping[str, str] | None = None, threads_per_rank: int = 1, **kwargs: Any) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` spawned ranks; return the results by rank.

    Args:
        timeout: seconds for the whole run before every rank is killed.
        grace: seconds the other ranks get, after one rank fails, to finish or fail
            on their own (they usually fail at once, in their next collective).
        backend: the torch.distributed backend inside the ranks.
        collective_timeout: seconds a collective inside the ranks waits for a peer.
        env: extra environment variables for the ranks.
        threads_per_rank: torch intra-op threads per rank; one keeps many ranks from
            fighting over a few cores.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    store = dist.TCPStore("127.0.0.1", 0, None, True, timeout=_td(timeout), wait_for_workers=False)
    procs = []
    for rank in range(world_size):
        rank_env = {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                    "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(store.port), "OMP_NUM_THREADS": str(threads_per_rank),
                    **(env or {})}
        p = ctx.Process(target=_rank_main, name=f"zero-rank-{rank}", daemon=True,
                        args=(fn, args, kwargs, rank_env, backend, collective_timeout, threads_per_rank, results))
        p.start()
        procs.append(p)
    try:
        reports = _supervise(procs, results, timeout, grace)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(10)
        results.close()
        del store
    pids = [p.pid for p in procs if p.pid is not None]
    failed = [r for r in reports.values() if r.outcome != "ok"]
    if failed:
        ordered = sorted(reports.values(), key=lambda r: (r.outcome == "ok", r.secondary, r.rank))
        timed_out = any(r.outcome == "timeout" for r in failed)
        head = (f"{len(failed)} of {world_size} ranks did not finish within {timeout:g}s"
                if timed_out else f"{len(failed)} of {world_size} ranks failed")
        first = ordered[0]
        message = f"{head} (first cause: rank {first.rank} {first.outcome}) in {_name(fn)}\n\n" + "\n\n".join(
            r.describe() for r in ordered if r.outcome != "ok")
        raise (RankTimeout if timed_out else RankFailure)(message, ordered, pids)
    return [reports[r].value for r in range(world_size)]


def _supervise(procs: list, results: mp.Queue, timeout: float, grace: float) -> dict[int, RankReport]:
    reports: dict[int, RankReport] = {}
    deadline = time.monotonic() + timeout
    kill_at = deadline
    while len(reports) < len(procs):
        try:
            kind, rank, payload, secondary = results.get(timeout=0.05)
        except queue.Empty:
            kind = None
        if kind is not None:
            reports[rank] = _report(kind, rank, payload, secondary)
        for rank, p in enumerate(procs):
            if rank in reports or p.exitcode is None:
                continue
            try:  # a rank that reported just before exiting: its message may still be in flight
                kind, r, payload, secondary = results.get(timeout=0.5)
                reports[r] = _report(kind, r, payload, secondary)
                continue
            except queue.Empty:
                pass
            reports[rank] = RankReport(rank, "died", _exit_description(p.exitcode))
        if any(r.outcome != "ok" for r in reports.values()):
            kill_at = min(kill_at, time.monotonic() + grace)
            grace = float("inf")  # the window opens once, at the first failure
        now = time.monotonic()
        if now >= kill_at:
            cause = "timeout" if now >= deadline else "killed"
            for rank, p in enumerate(procs):
                if rank not in reports:
                    p.kill()
                    detail = ("still running when the timeout expired" if cause == "timeout"
                              else "still running after another rank failed; killed by the harness")
                    reports[rank] = RankReport(rank, cause, detail, secondary=cause == "killed")
    return reports


def _report(kind: str, rank: int, payload: Any, secondary: bool) -> RankReport:
    if kind == "ok":
        return RankReport(rank, "ok", value=torch.load(io.BytesIO(payload), weights_only=False))
    return RankReport(rank, kind, payload, secondary)


def _rank_main(fn: Callable[..., Any], args: tuple, kwargs: dict, env: dict[str, str], backend: str,
               collective_timeout: float, threads: int, results: mp.Queue) -> None:
    os.environ.update(env)
    torch.set_num_threads(threads)
    rank = int(env["RANK"])
    code = 0
    try:
        store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), None, False,
                              timeout=_td(collective_timeout))
        init_distributed(backend, store=store, timeout=collective_timeout)
        value = fn(*args, **kwargs)
        results.put(("ok", rank, _to_bytes(value), False))
    except BaseException as exc:
        secondary = isinstance(exc, (CommError, dist.DistError))
        results.put(("raised", rank, traceback.format_exc().rstrip(), secondary))
        code = 1
    finally:
        results.close()
        results.join_thread()
    if code:
        os._exit(code)  # do not wait on collectives or threads a dead peer left behind
    if dist.is_initialized():
        dist.destroy_process_group()


def _to_bytes(value: Any) -> bytes:
    # Tensors must not travel through the queue as shared memory: the rank exits
    # before the parent reads them. Serialise them into plain bytes instead.
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _exit_description(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"process killed by signal {signal.Signals(-exitcode).name} before reporting"
        except ValueError:
            return f"process killed by signal {-exitcode} before reporting"
    return f"process exited with code {exitcode} before reporting"


def _name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _td(seconds: float):
    from datetime import timedelta

    return timedelta(seconds=seconds)


def live_tensor_bytes(device: str = "cpu") -> int:
    """Bytes of every distinct storage that a live tensor on ``device`` holds in this process: what a
    memory test counts, walked from the garbage collector's objects (not from any code's own counters)."""
    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            with warnings.catch_warnings():  # some module objects warn when inspected (torch's reduce_op)
                warnings.simplefilter("ignore")
                is_tensor = isinstance(obj, torch.Tensor)
        except ReferenceError:
            continue
        if is_tensor and obj.device.type == device:
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen and storage.nbytes():
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total
