"""Run every benchmark, each against its baseline in the same run, then write docs/benchmarks.md.

    nox -s bench                                 # what to run: installs zero, matplotlib, transformers
    python benchmarks/bench.py [--only zero_step,memory] [--skip pipe] [--dir /tmp]

The benchmarks run one after another, each in its own process (a progress line as each starts, its own
lines as it goes, its wall time and exit status as it ends), writing JSON and PNG into
``benchmarks/results/``. Then ``report.py`` renders the page from those files with the machine and
the date. A benchmark that fails is reported as failed, with its last output, and the run goes on;
the exit status is 1 if any failed. ``offload_scale`` (ZeRO-Infinity on a model larger than memory,
tens of GiB on disk) runs only when named in ``--only``. DeepSpeed is measured by the optional ``nox -s deepspeed``
session; the page shows its last result if there is one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import report

HERE = Path(__file__).resolve().parent


# run only when named with --only: it trains a 2.4B-parameter model from NVMe, minutes where the CPU
# multiplies bf16 natively and hours where it does not (torch's reference bf16 GEMM)
ON_REQUEST = {"offload_scale"}


def cases(tmp: str) -> list[tuple[str, list[str], dict[str, str]]]:
    """(name, arguments, environment) of every benchmark, quickest to set up first. Distributed ones run a
    thread per rank (ranks share the cores); the single-process bandwidth ones use every core."""
    one = {"OMP_NUM_THREADS": "1"}
    return [
        ("zero_step", ["zero_step.py", "--dir", tmp], one),
        ("memory", ["memory.py"], one),
        ("scaling", ["scaling.py"], one),
        ("comm", ["comm.py"], one),
        ("ckpt", ["ckpt.py", "--dir", tmp], one),
        ("offload", ["offload.py", "--dir", tmp], {}),
        ("activations", ["activations.py"], one),
        ("pipe", ["pipe.py"], one),
        ("zeropp", ["zeropp.py", "--steps", "20"], one),
        ("inference", ["inference.py", "--quick"], one),
        ("kernels", ["kernels.py", "--quick", "--device", "cpu"], {}),
        ("offload_scale", ["offload_scale.py", "--dir", tmp], {}),
    ]


def run_case(name: str, argv: list[str], env: dict[str, str], out: Path) -> dict:
    command = [sys.executable, str(HERE / argv[0]), *argv[1:], "--out", str(out)]
    start = time.perf_counter()
    tail: deque[str] = deque(maxlen=15)
    with subprocess.Popen(command, cwd=HERE, env={**os.environ, "PYTHONUNBUFFERED": "1", **env}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(f"    {line}", end="", flush=True)
            tail.append(line.rstrip())
    seconds = time.perf_counter() - start
    return {"name": name, "command": " ".join(["python", f"benchmarks/{argv[0]}", *argv[1:]]),
            "env": env, "seconds": round(seconds, 1), "returncode": proc.returncode, "tail": list(tail)}


def sweep(directory: str) -> None:
    """Remove the swap files of a benchmark that was killed (a timeout, ^C, out of memory): an NVMe
    store deletes its own on close, but a killed one leaves them -- tens of GiB for offload_scale."""
    from zero_offload import sweep_orphans

    sweep_orphans(Path(directory))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated names to run (default: all)")
    parser.add_argument("--skip", default="", help="comma-separated names not to run")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where benchmarks write their files")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--doc", type=Path, default=HERE.parent / "docs" / "benchmarks.md")
    args = parser.parse_args()
    todo = cases(args.dir)
    names = [n for n, _, _ in todo]
    only, skip = (set(filter(None, s.split(","))) for s in (args.only, args.skip))
    unknown = (only | skip) - set(names)
    if unknown:
        parser.error(f"no benchmark named {', '.join(sorted(unknown))}; the benchmarks are {', '.join(names)}")
    todo = [c for c in todo if (c[0] in only if only else c[0] not in ON_REQUEST) and c[0] not in skip]
    args.out.mkdir(parents=True, exist_ok=True)
    runs_path = args.out / "bench.json"
    previous = json.loads(runs_path.read_text()) if runs_path.exists() else {}
    # a partial run keeps the earlier results of the others (the page says which run measured what)
    runs = {r["name"]: r for r in previous.get("runs", []) if r["name"] not in ON_REQUEST} if only or skip else {}
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    sweep(args.dir)  # what an earlier, killed run left
    for i, (name, argv, env) in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {name}: {' '.join(argv)}", flush=True)
        try:
            run = run_case(name, argv, env, args.out)
        finally:
            sweep(args.dir)
        run["date"] = started
        runs[name] = run
        status = "ok" if run["returncode"] == 0 else f"FAILED (exit {run['returncode']})"
        print(f"[{i}/{len(todo)}] {name}: {status} in {run['seconds']:.0f} s", flush=True)
        runs_path.write_text(json.dumps({"machine": report.machine(), "runs": list(runs.values())}, indent=1))
    report.write(args.out, args.doc)
    print(f"wrote {args.doc}")
    failed = [r["name"] for r in runs.values() if r["returncode"] != 0]
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
