"""Soak: a long stage-3 + CPU-offload run saving every tenth of the way. Resident memory stays flat (its
slope is printed), threads and open files do not grow, no partial checkpoint or swap file is left, and
the same run SIGKILLed three times at random steps and resumed each time from ``latest`` gives every
step's loss, and the final weights, bit for bit. ``ZERO_SOAK_STEPS`` sets the length (CI: 2000)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TRAIN = str(Path(__file__).with_name("train.py"))
STEPS = int(os.environ.get("ZERO_SOAK_STEPS", "2000"))
ARGS = ["--stage", "3", "--offload", "cpu", "--steps", str(STEPS), "--save-every", str(max(STEPS // 10, 1)),
        "--resources"]
ZERO = [sys.executable, "-m", "zero_all", "run", "--nproc", "2", TRAIN, *ARGS]
pytestmark = pytest.mark.timeout(1800)


def records(out: Path, rank: int = 0) -> list[dict]:
    path = Path(f"{out}.rank{rank}")
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def slope(ys: list[float]) -> float:
    """Least-squares growth per step."""
    n = len(ys)
    mx, my = (n - 1) / 2, sum(ys) / n
    return sum((x - mx) * (y - my) for x, y in enumerate(ys)) / sum((x - mx) ** 2 for x in range(n))


def test_a_long_run_stays_flat_and_a_killed_and_resumed_one_ends_on_the_same_loss(tmp_path: Path):
    out, ck = tmp_path / "whole", tmp_path / "ck"
    began = time.monotonic()
    run = subprocess.run([*ZERO, "--save-dir", str(ck), "--out", str(out)], capture_output=True, text=True,
                         timeout=1500, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    whole = {r: records(out, r) for r in (0, 1)}
    for rank, rs in whole.items():
        assert [r["step"] for r in rs] == list(range(1, STEPS + 1))
        settled = rs[len(rs) // 2:]  # after warm-up: allocator pools, first saves
        rss = [r["rss"] for r in settled]
        growth = slope(rss) * STEPS  # what the trend would add over a whole run
        print(f"rank {rank}: {STEPS} steps in {time.monotonic() - began:.0f} s; RSS {rss[0] / 2**20:.1f} -> "
              f"{rss[-1] / 2**20:.1f} MiB, slope {slope(rss):.1f} B/step ({growth / 2**20:.2f} MiB per "
              f"{STEPS} steps); threads {settled[0]['threads']}->{rs[-1]['threads']}, fds "
              f"{settled[0]['fds']}->{rs[-1]['fds']}")
        assert growth < max(0.02 * rss[0], 8 << 20), f"rank {rank}: resident memory grows {slope(rss):.0f} B/step"
        assert max(r["threads"] for r in settled) == settled[0]["threads"], "threads grow"
        assert max(r["fds"] for r in settled) == settled[0]["fds"], "open files grow"
        assert all(not r["stray"] and r["swap_files"] == 0 for r in rs)
    assert sorted(p.name for p in ck.iterdir()) == sorted(["latest", *(f"step{s}" for s in range(
        STEPS // 10, STEPS + 1, STEPS // 10))])

    # the same run, SIGKILLed three times and resumed from latest each time
    rng = random.Random(1)
    killed, ck2 = tmp_path / "killed", tmp_path / "ck2"
    kills = sorted(rng.sample(range(STEPS // 10 + 1, STEPS - 1), 3))
    for at in kills:
        proc = subprocess.Popen([*ZERO, "--save-dir", str(ck2), "--out", str(killed), "--resume"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 900
        while not records(killed) or records(killed)[-1]["step"] < at:
            assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before step {at}"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    run = subprocess.run([*ZERO, "--save-dir", str(ck2), "--out", str(killed), "--resume"], capture_output=True,
                         text=True, timeout=1500, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    for rank in (0, 1):
        again = records(killed, rank)
        by_step = {r["step"]: r for r in whole[rank]}
        assert again[-1]["step"] == STEPS
        assert len({r["step"] for r in again}) == STEPS, "a step was skipped on resume"
        for r in again:  # every step, also those run twice around a kill
            assert (r["loss"], r["weight"]) == (by_step[r["step"]]["loss"], by_step[r["step"]]["weight"]), r["step"]
    print(f"killed at steps {kills}, resumed from latest each time: final loss {again[-1]['loss']!r} "
          f"== uninterrupted {whole[1][-1]['loss']!r}")
