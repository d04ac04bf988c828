"""Launching the Hugging Face scripts on CPU ranks for the tests: ``torchrun`` as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
CONFIGS = HERE / "configs"


def torchrun(*args: str, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``args`` (a script and its arguments) on ``nproc`` ranks; raise with the ranks' output on failure."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    for attempt in (1, 2):
        done = subprocess.run(cmd, check=False, cwd=HERE, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode == 0:
            return done
        lines = (done.stdout + done.stderr).splitlines()
        # a rank's own last words come before torchrun's summary of the failure: keep both
        cause = [line for line in lines if any(w in line for w in ("Error", "terminate", "abort", "what()"))]
        tail = "\n".join([*cause[-20:], "...", *lines[-15:]])
        # A rank of these HF scripts was seen killed by SIGABRT, with no Python error, 4 times while a
        # second test suite loaded this 2-core machine; never in about 15 runs alone, nor in 12 runs of
        # the script side by side. Such a run is tried once more (and said so); any other failure counts
        aborted = "exitcode  : -6" in done.stdout + done.stderr
        if attempt == 2 or not aborted:
            raise AssertionError(f"{' '.join(args)} failed (exit {done.returncode}):\n{tail}")
        print(f"warning: a rank of {' '.join(args)} was aborted (SIGABRT); running it again:\n{tail}",
              file=sys.stderr)
    raise AssertionError("unreachable")


def trainer(out: Path, config: str | None, *extra: str, nproc: int = 2) -> dict[str, float]:
    """trainer_script.py with ``configs/<config>.json`` (None: plain DDP); its per-step losses."""
    ds = ["--deepspeed", str(CONFIGS / f"{config}.json")] if config else []
    torchrun("trainer_script.py", "--out", str(out), *ds, *extra, nproc=nproc)
    return json.loads((out / "losses.json").read_text())


def accelerate(out: Path, config: str | None, *extra: str) -> dict[str, Any]:
    """accelerate_script.py through cpu_state.py (see there) with ``configs/<config>.json`` (None: DDP)."""
    ds = ["--deepspeed", str(CONFIGS / f"{config}.json")] if config else []
    torchrun("cpu_state.py", "accelerate_script.py", "--out", str(out), *ds, *extra)
    return json.loads((out / "losses.json").read_text())


def zero_answers_import_deepspeed() -> bool:
    """Whether ``import deepspeed`` gives zero_all here (``zero hf enable``); find_spec alone would read
    zero_all's own spec once something has imported it."""
    import zero_all

    try:
        import deepspeed
    except ImportError:
        return False
    return deepspeed is zero_all


def worst(a: dict[str, float], b: dict[str, float]) -> float:
    assert a.keys() == b.keys(), f"steps {sorted(a)} vs {sorted(b)}"
    return max(abs(a[k] - b[k]) for k in a)
