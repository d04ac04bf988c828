"""``zero run``: start a training script on every rank through torch's own launcher (torchrun).

zero does not replace the launcher: this builds ``torch.distributed.run``'s arguments
from zero's (fewer, with CPU-friendly defaults) and runs its agent in this process,
which starts one worker per rank, forwards SIGINT/SIGTERM to them and tears them
all down when one fails. The exit status is the failing worker's own (128 + signal
for a worker killed by a signal, or for the launcher itself interrupted).

Rendezvous: one node runs standalone (a private c10d store on a free port); several
nodes meet at ``--rdzv-endpoint`` (c10d: any node may host it, the first to bind
does) or at ``--master-addr:--master-port`` (static: node 0 hosts it). A DeepSpeed
hostfile (``host slots=N`` lines) gives the node count, the ranks per node and,
unless an endpoint is given, the master (its first host). Like torchrun, and unlike
DeepSpeed's launcher, ``zero run`` starts the ranks of *this* node: run it on every
node (by hand, ssh, pdsh or a scheduler).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["HostfileError", "LaunchError", "LaunchPlan", "parse_hostfile", "plan_launch", "run_launch"]


class HostfileError(ValueError):
    """A hostfile that cannot be used; the message names the file and line."""


_LINE = re.compile(r"^(?P<host>[^\s=]+)(?:\s+slots\s*=\s*(?P<slots>\S+))?\s*$")


def parse_hostfile(path: str | Path) -> list[tuple[str, int]]:
    """``[(host, slots), ...]`` from a DeepSpeed hostfile: one ``host slots=N`` per line, ``#`` comments."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise HostfileError(f"hostfile {path}: {exc.strerror or exc}") from None
    hosts: list[tuple[str, int]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _LINE.match(line)
        if match is None:
            raise HostfileError(f"hostfile {path} line {number}: expected 'host slots=N', got {raw.strip()!r}")
        host, slots_text = match["host"], match["slots"]
        if slots_text is None:
            raise HostfileError(f"hostfile {path} line {number}: {host!r} has no 'slots=N'")
        if not slots_text.isdigit() or int(slots_text) < 1:
            raise HostfileError(f"hostfile {path} line {number}: slots must be a positive integer, "
                                f"got {slots_text!r}")
        if any(h == host for h, _ in hosts):
            raise HostfileError(f"hostfile {path} line {number}: host {host!r} is listed twice")
        hosts.append((host, int(slots_text)))
    if not hosts:
        raise HostfileError(f"hostfile {path} names no hosts")
    slots = {s for _, s in hosts}
    if len(slots) > 1:
        raise HostfileError(f"hostfile {path}: every host must have the same slots (torchrun starts the same "
                            f"number of ranks on each node), got {', '.join(f'{h}={s}' for h, s in hosts)}")
    return hosts


def _this_host_index(hosts: list[tuple[str, int]]) -> int | None:
    names = {socket.gethostname(), socket.getfqdn(), "localhost", "127.0.0.1"}
    with contextlib.suppress(OSError):
        names.update(socket.gethostbyname_ex(socket.gethostname())[2])
    matches = [i for i, (h, _) in enumerate(hosts) if h in names]
    return matches[0] if len(matches) == 1 else None


@dataclass(frozen=True)
class LaunchPlan:
    """What ``zero run`` asks torchrun for."""

    nnodes: int
    nproc: int
    node_rank: int | None
    rendezvous: str  # "standalone", "c10d" or "static"
    endpoint: str | None
    rdzv_id: str | None

    def torchrun_argv(self, script: str, script_args: list[str], *, module: bool = False,
                      extra: list[str] | tuple[str, ...] = (), wrap: bool = False) -> list[str]:
        """torchrun's arguments; ``extra`` are torchrun options passed through as given; ``wrap`` runs
        the target through :mod:`zero_all._cli._rank` (failure reports, dies with the launcher)."""
        argv = [f"--nnodes={self.nnodes}", f"--nproc-per-node={self.nproc}"]
        if self.rendezvous == "standalone":
            argv.append("--standalone")
        elif self.rendezvous == "c10d":
            argv += ["--rdzv-backend=c10d", f"--rdzv-endpoint={self.endpoint}", f"--rdzv-id={self.rdzv_id}"]
        else:
            host, port = (self.endpoint or "").rsplit(":", 1)
            argv += [f"--master-addr={host}", f"--master-port={port}"]
        if self.node_rank is not None:
            argv.append(f"--node-rank={self.node_rank}")
        argv += list(extra)
        if wrap:
            return [*argv, "-m", "zero_all._cli._rank", "--module" if module else "--script", script, *script_args]
        return [*argv, *(["-m"] if module else []), script, *script_args]


def default_nproc() -> int:
    """Ranks per node: one per CUDA device, else two CPU ranks."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def plan_launch(*, nproc: int | None, nnodes: int | None, node_rank: int | None, master_addr: str | None,
                master_port: int | None, rdzv_endpoint: str | None, rdzv_id: str | None,
                hostfile: str | None) -> LaunchPlan:
    """Check the options against each other and pick the rendezvous."""
    if hostfile is not None:
        hosts = parse_hostfile(hostfile)
        if nnodes is not None and nnodes != len(hosts):
            raise ValueError(f"--nnodes {nnodes} disagrees with the hostfile's {len(hosts)} hosts")
        if nproc is not None and nproc != hosts[0][1]:
            raise ValueError(f"--nproc {nproc} disagrees with the hostfile's slots={hosts[0][1]}")
        nnodes, nproc = len(hosts), hosts[0][1]
        if node_rank is None and nnodes > 1:
            node_rank = _this_host_index(hosts)
            if node_rank is None:
                raise ValueError(f"cannot tell which host of {hostfile} this is ({socket.gethostname()}): "
                                 "pass --node-rank")
        if rdzv_endpoint is None and master_addr is None and nnodes > 1:
            master_addr = hosts[0][0]
    nnodes = nnodes or 1
    nproc = nproc if nproc is not None else default_nproc()
    if nnodes < 1 or nproc < 1:
        raise ValueError(f"--nnodes and --nproc must be >= 1, got {nnodes} and {nproc}")
    if node_rank is not None and not 0 <= node_rank < nnodes:
        raise ValueError(f"--node-rank {node_rank} is outside 0..{nnodes - 1}")
    if rdzv_endpoint is not None and (master_addr is not None or master_port is not None):
        raise ValueError("give either --rdzv-endpoint (c10d) or --master-addr/--master-port (static), not both")
    if rdzv_endpoint is not None:
        host, _, port = rdzv_endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--rdzv-endpoint wants HOST:PORT, got {rdzv_endpoint!r}")
        if nnodes > 1 and not rdzv_id:
            raise ValueError("--rdzv-endpoint with several nodes needs --rdzv-id (the same on every node)")
        return LaunchPlan(nnodes, nproc, node_rank, "c10d", rdzv_endpoint, rdzv_id or "zero")
    if nnodes == 1 and master_addr is None and master_port is None:
        return LaunchPlan(1, nproc, None, "standalone", None, None)
    if nnodes > 1 and (master_addr is None or node_rank is None):
        raise ValueError(f"{nnodes} nodes need a rendezvous: --rdzv-endpoint HOST:PORT --rdzv-id ID, or "
                         "--master-addr A --master-port P --node-rank R, or --hostfile")
    endpoint = f"{master_addr or '127.0.0.1'}:{master_port or 29500}"
    return LaunchPlan(nnodes, nproc, node_rank if node_rank is not None else 0, "static", endpoint, None)


class LaunchError(RuntimeError):
    """The launch itself failed in a way the user can fix (a port in use): one line, exit status 2."""


def rdzv_timeout() -> float:
    """How long ``zero run`` waits for an answer from a c10d rendezvous endpoint: ``ZERO_RDZV_TIMEOUT``
    seconds, else 60."""
    raw = os.environ.get("ZERO_RDZV_TIMEOUT", "60")
    try:
        seconds = float(raw)
    except ValueError:
        raise LaunchError(f"ZERO_RDZV_TIMEOUT={raw!r} is not a number of seconds") from None
    if seconds <= 0:
        raise LaunchError(f"ZERO_RDZV_TIMEOUT must be positive, got {raw}")
    return seconds


def probe_endpoint(endpoint: str, timeout: float) -> None:
    """Refuse a c10d endpoint where something listens that is not a c10d store within ``timeout``
    seconds (torch's store client blocks for as long as such a process holds the port). Nothing
    listening is fine: this node, or a peer starting later, hosts the store."""
    import threading
    from datetime import timedelta

    from torch.distributed import TCPStore

    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=min(timeout, 5.0)):
            pass
    except OSError:
        return
    outcome: list[BaseException | None] = []

    def ask() -> None:
        try:
            store = TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=timeout))
            store.num_keys()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=ask, name="zero-rdzv-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise LaunchError(f"rendezvous endpoint {endpoint}: a process listens there but gave no c10d store "
                          f"answer within {timeout:g}s (another program holds the port? ZERO_RDZV_TIMEOUT "
                          "sets the wait)")
    if outcome[0] is not None:
        raise LaunchError(f"rendezvous endpoint {endpoint}: not a c10d store "
                          f"({str(outcome[0]).splitlines()[0]})")


def run_launch(plan: LaunchPlan, script: str, script_args: list[str], *, module: bool = False,
               extra: list[str] | tuple[str, ...] = ()) -> int:
    """Run torchrun's agent here; return the exit status of the job."""
    import tempfile

    from torch.distributed import DistNetworkError
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if plan.rendezvous == "c10d" and plan.endpoint:
        probe_endpoint(plan.endpoint, rdzv_timeout())
    shown = plan.torchrun_argv(script, script_args, module=module, extra=extra)
    print(f"zero run: torchrun {' '.join(shown)}", file=sys.stderr, flush=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun would set it too, with a warning per run
    os.environ["ZERO_LAUNCHER_PID"] = str(os.getpid())
    with tempfile.TemporaryDirectory(prefix="zero-run-") as reports:
        os.environ["ZERO_RUN_REPORTS"] = reports
        argv = plan.torchrun_argv(script, script_args, module=module, extra=extra, wrap=True)
        parser = torchrun.get_args_parser()
        parser.allow_abbrev = False
        cut = len(argv) - len(script_args) - 2  # the script's own arguments never go through argparse
        options = parser.parse_args(argv[:cut])
        options.training_script_args = argv[cut:]
        os.environ["ZERO_SWAP_REGISTRY"] = str(Path(reports) / "swap-roots")
        try:
            torchrun.run(options)
        except ChildFailedError as exc:
            return _report_failure(exc, Path(reports))
        except SignalException as exc:
            print(f"zero run: interrupted by {signal.Signals(exc.sigval).name}; the ranks were stopped",
                  file=sys.stderr, flush=True)
            return 128 + int(exc.sigval)
        except DistNetworkError as exc:
            if "EADDRINUSE" in str(exc) or "address already in use" in str(exc):
                raise LaunchError(f"rendezvous port {plan.endpoint or ''} is already in use by another process "
                                  "(pick another --master-port / --rdzv-endpoint)") from None
            raise
        finally:
            _sweep_swap_roots(Path(reports) / "swap-roots")
    return 0


def _sweep_swap_roots(registry: Path) -> None:
    """Remove the swap files of ranks that died without cleaning up (SIGKILL, out of memory, or stopped by
    torchrun while blocked): each NVMe store recorded its path here, and a dead store's lock is free."""
    from zero_offload import sweep_orphans

    roots = {path.read_text() for path in registry.glob("*")} if registry.is_dir() else set()
    for root in sorted(roots):
        sweep_orphans(Path(root))


def _report_failure(exc: Any, reports: Path) -> int:
    """Name the rank to blame, by the wrappers' reports of the last attempt: the first with an error of
    its own; else (every report is a collective failing on a peer) a rank that died without a Python
    error, or one that was still running -- hung -- when its peers timed out waiting for it."""
    import json

    found, started = [], []
    for path in reports.glob("attempt*-rank*.json"):
        with contextlib.suppress(OSError, ValueError):
            found.append(json.loads(path.read_text()))
    for path in reports.glob("attempt*-rank*.start"):
        with contextlib.suppress(ValueError):
            attempt, rank = path.stem.removeprefix("attempt").split("-rank")
            started.append((int(attempt), int(rank)))
    failures = exc.failures  # global rank -> ProcessFailure, those that had exited when the agent looked
    if found:
        last = max(r["attempt"] for r in found)
        found = sorted((r for r in found if r["attempt"] == last), key=lambda r: r["time"])
        own = [r for r in found if not r.get("peer")]
        if not own:
            return _blame_silent_rank(found, {r for a, r in started if a == last}, failures)
        first = own[0]
        rank, code, line = first["rank"], int(first["code"]), first["line"]
        users = {r["line"] for r in found if r["user"]}
        if first["user"] and users == {line}:
            ranks = sorted(r["rank"] for r in found if r["line"] == line)
            who = f"rank {rank}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"
            print(f"zero run: error: {who}: {line}", file=sys.stderr, flush=True)
            return code or 1
        how = f"failed first: {line}" if line else f"failed first (exit code {code})"
        if line is None:
            how = f"exited with code {code}"
        print(f"zero run: error: rank {rank} {how} (its output is above)", file=sys.stderr, flush=True)
        return code or 1
    rank, failure = exc.get_first_failure()
    print(f"zero run: error: rank {rank} {_exit_words(failure.exitcode)} (its output is above)",
          file=sys.stderr, flush=True)
    return _exit_status(failure.exitcode)


def _exit_words(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by signal {-code} ({signal.Signals(-code).name})"
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _exit_status(code: int) -> int:
    return (128 - code if code < 0 else code) or 1


def _blame_silent_rank(found: list[dict], started: set[int], failures: dict[int, Any]) -> int:
    """Every report is a rank whose collective failed on a peer: blame the peer that said nothing."""
    reported = {r["rank"] for r in found}
    waiting = ", ".join(map(str, sorted(reported)))
    waited = f"rank{'s' if len(reported) > 1 else ''} {waiting} failed waiting for it ({found[0]['line']})"
    # the agent stops the ranks still running with SIGTERM once one has failed: those were not dead
    died = sorted(r for r in failures if r not in reported and failures[r].exitcode != -signal.SIGTERM)
    if died:
        code = failures[died[0]].exitcode
        print(f"zero run: error: rank {died[0]} {_exit_words(code)} without a Python error; {waited}",
              file=sys.stderr, flush=True)
        return _exit_status(code)
    hung = sorted((started | set(failures)) - reported)
    if hung:
        who = f"rank {hung[0]}" if len(hung) == 1 else f"ranks {', '.join(map(str, hung))}"
        print(f"zero run: error: {who} stopped responding (still running, so stopped by the launcher); {waited}",
              file=sys.stderr, flush=True)
        return int(found[0]["code"]) or 1
    first = found[0]
    print(f"zero run: error: rank {first['rank']} failed first, waiting for a peer on another node: "
          f"{first['line']} (its output is above)", file=sys.stderr, flush=True)
    return int(first["code"]) or 1
