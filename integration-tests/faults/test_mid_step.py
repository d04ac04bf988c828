"""A rank that dies or raises in the middle of a training step, at 2 and 4 ranks: every other rank and
``zero run`` exit non-zero well within 60 s (not after Gloo's 30-minute timeout), the launcher's last
line names the rank and its cause, and no rank outlives the job."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

TRAIN = str(Path(__file__).with_name("train.py"))
pytestmark = pytest.mark.timeout(180)


def launch(tmp_path: Path, nproc: int, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    began = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "zero_all", "run", "--nproc", str(nproc), TRAIN, "--stage", "2",
                          "--steps", "8", "--out", str(tmp_path / "o"), *args],
                         capture_output=True, text=True, timeout=120, check=False)
    return run, time.monotonic() - began


def ranks_left(script: str) -> list[str]:
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    return [line for line in ps.splitlines() if script in line and "pytest" not in line]


@pytest.mark.parametrize("nproc", [2, 4])
@pytest.mark.parametrize("how", ["raises", "sigkill"])
def test_a_rank_failing_mid_step_ends_the_job_fast_and_is_named(tmp_path: Path, nproc: int, how: str):
    bad = nproc - 1
    fault = ["--raise-step" if how == "raises" else "--die-step", "3", "--poison-rank", str(bad)]
    run, took = launch(tmp_path, nproc, *fault)
    print(f"{nproc} ranks, rank {bad} {how} in step 4: every rank and zero run exited in {took:.1f} s")
    assert run.returncode != 0 and took < 60, run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    if how == "raises":
        assert last.startswith(f"zero run: error: rank {bad} failed first: RuntimeError: rank {bad} found a bad "
                               "batch in step 4"), last
    else:
        assert last.startswith(f"zero run: error: rank {bad} was killed by signal 9 (SIGKILL)"), last
    assert not ranks_left(str(tmp_path / "o")), "a rank outlived the job"
