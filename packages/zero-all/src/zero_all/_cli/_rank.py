"""What each rank of ``zero run`` runs: the user's script or module, inside a thin wrapper.

``python -m zero_all._cli._rank (--script PATH | --module NAME) ARGS...`` runs the target
as ``python PATH ARGS`` or ``python -m NAME ARGS`` would (``sys.argv``, ``sys.path[0]``,
``__main__``), and adds three things:

- the rank dies with its launcher: on Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` (and a
  check that the launcher, ``ZERO_LAUNCHER_PID``, is still its parent); elsewhere a daemon
  thread that exits when the parent changes. A SIGKILLed ``zero run`` leaves no orphans.
- a failure is reported to the launcher: ``ZERO_RUN_REPORTS/attempt<A>-rank<R>.json``
  with the time, the exit code, the error's last line and whether it was a collective
  failing on a peer, so the launcher names the rank that failed *first* with an error of
  its own (torchrun names whichever it polled, often a peer that failed later because the
  first one vanished). ``attempt<A>-rank<R>.start`` marks each rank that started, so a
  rank that hung, or died without a Python error, while its peers timed out waiting for it
  is the one named.
- zero's own user errors (a bad config, a bad hostfile, a checkpoint that is not one)
  are not printed as a traceback on every rank: the launcher prints their one line once.
  ``ZERO_TRACEBACK=1`` prints the full traceback too. Any other exception prints its
  traceback as Python would.

As the application's launcher it also shows zero's INFO lines (the ``steps_per_print``
line) on stderr while the script has not configured logging itself; the library never
does this on import or in ``initialize``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import runpy
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

# zero's exceptions whose message is the whole story (matched by name: nothing is imported here)
USER_ERRORS = frozenset({
    "zero_all._config._error.ConfigError",
    "zero_all._cli._run.HostfileError",
    "zero_ckpt._format.CheckpointError",
})


# a collective that failed on a peer (timed out waiting, connection closed): the peer's failure is the story.
# zero_comm's CommError is not listed (it also means "not initialised"): the backend error it was raised
# from is, and torch.distributed on Gloo raises a plain RuntimeError from the transport.
PEER_ERRORS = frozenset({"torch.distributed.DistError"})
PEER_MESSAGES = ("gloo/transport", "Connection closed by peer", "Timed out waiting")


def _names(exc: BaseException) -> set[str]:
    return {f"{c.__module__}.{c.__qualname__}" for c in type(exc).__mro__}


def is_user_error(exc: BaseException) -> bool:
    return bool(_names(exc) & USER_ERRORS)


def failed_on_peer(exc: BaseException) -> bool:
    """``exc`` (or an exception it was raised from) is a collective that failed waiting on a peer."""
    seen: BaseException | None = exc
    while seen is not None:
        if _names(seen) & PEER_ERRORS or any(m in str(seen) for m in PEER_MESSAGES):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _die_with_launcher() -> None:
    launcher = int(os.environ.get("ZERO_LAUNCHER_PID", "0") or 0)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        if launcher and os.getppid() != launcher:  # it died before prctl
            os._exit(128 + signal.SIGKILL)
        return
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(128 + signal.SIGKILL)

    threading.Thread(target=watch, name="zero-launcher-watch", daemon=True).start()


def _rank_attempt() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def _report_path(suffix: str) -> Path | None:
    folder = os.environ.get("ZERO_RUN_REPORTS")
    if not folder:
        return None
    rank, attempt = _rank_attempt()
    return Path(folder) / f"attempt{attempt}-rank{rank}{suffix}"


def _report(code: int, line: str | None, user: bool, peer: bool = False) -> None:
    if (path := _report_path(".json")) is None:
        return
    rank, attempt = _rank_attempt()
    with contextlib.suppress(OSError):
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rank": rank, "attempt": attempt, "time": time.time(), "code": code,
                                   "line": line, "user": user, "peer": peer, "pid": os.getpid()}))
        tmp.replace(path)


def _report_start() -> None:
    if (path := _report_path(".start")) is not None:
        with contextlib.suppress(OSError):
            path.write_text(str(os.getpid()))


def _last_line(exc: BaseException) -> str:
    return traceback.format_exception_only(type(exc), exc)[-1].strip()


class _UntilConfigured(logging.StreamHandler):
    """stderr for zero's records until the script gives the root logger a handler (then those print them)."""

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            super().emit(record)


def _show_zero_lines() -> None:
    handler = _UntilConfigured(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(asctime)s] [%(name)s] %(message)s"))
    zero = logging.getLogger("zero_all")
    zero.addHandler(handler)
    if zero.level == logging.NOTSET:
        zero.setLevel(logging.INFO)


def main(argv: list[str]) -> int:
    _die_with_launcher()
    _show_zero_lines()
    if len(argv) < 2 or argv[0] not in ("--script", "--module"):
        print("usage: python -m zero_all._cli._rank (--script PATH | --module NAME) ARGS...", file=sys.stderr)
        return 2
    kind, target, args = argv[0], argv[1], argv[2:]
    _report_start()
    try:
        if kind == "--script":
            sys.argv = [target, *args]
            sys.path[0] = os.path.dirname(os.path.abspath(target))
            runpy.run_path(target, run_name="__main__")
        else:
            sys.argv = [target, *args]  # run_module sets argv[0] to the module's file
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if code:
            if not isinstance(exc.code, int):
                print(exc.code, file=sys.stderr)
            _report(code, None, False)
        return code
    except BaseException as exc:
        user = is_user_error(exc)
        if kind == "--module" and isinstance(exc, ModuleNotFoundError) and exc.name and \
                (target == exc.name or target.startswith(exc.name + ".")):
            user = True  # `zero run -m typo`
        _report(1, f"{type(exc).__name__}: {exc}" if user else _last_line(exc), user, failed_on_peer(exc))
        if not user or os.environ.get("ZERO_TRACEBACK", "") not in ("", "0"):
            traceback.print_exception(exc)
        sys.stderr.flush()
        return 130 if isinstance(exc, KeyboardInterrupt) else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
