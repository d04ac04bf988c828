"""SIGKILL of every rank (and the launcher) while ``save_checkpoint`` is writing, many times: the
checkpoint ``latest`` names is always whole and loads, and a partial save is never taken for one."""

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

import zero_ckpt
from zero_ckpt import CheckpointError

TRAIN = str(Path(__file__).with_name("train.py"))
ZERO = [sys.executable, "-m", "zero_all", "run", "--nproc", "2"]
LANDED = 5  # kills that must land while a save is being written
MAX_KILLS = 16  # on a loaded machine a save may end before the kill lands: try again
pytestmark = pytest.mark.timeout(600)


def start(ck: Path, out: Path) -> subprocess.Popen[bytes]:
    """Train for good, saving every step (50 MB a save: long enough to be hit), resuming from latest."""
    return subprocess.Popen([*ZERO, TRAIN, "--stage", "2", "--steps", "100000", "--save-every", "1", "--save-dir",
                             str(ck), "--resume", "--width", "2048", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "TMPDIR": str(ck.parent)})  # a SIGKILLed launcher cannot clean up


def kill_during_a_save(proc: subprocess.Popen[bytes], ck: Path, nth: int, delay: float) -> bool:
    """Once this run's ``nth`` save is under way, wait ``delay`` and SIGKILL the whole job; whether a save
    was in flight then."""
    deadline = time.monotonic() + 120
    stale = set(ck.glob("*.partial-*"))  # left by the last kill: this run's first save sweeps them
    begun: set[Path] = set()
    while len(begun) < nth:
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it was killed (exit {proc.returncode}): "
                        f"{proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        assert time.monotonic() < deadline, f"{nth} saves did not start within 120 s"
        begun |= set(ck.glob("*.partial-*")) - stale
        time.sleep(0.001)
    time.sleep(delay)
    during = bool(set(ck.glob("*.partial-*")) - stale)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks at once: nobody cleans up
    proc.wait(timeout=60)
    proc.stderr.close()  # type: ignore[union-attr]
    return during


def test_sigkill_of_every_rank_during_save_leaves_latest_whole_and_loadable(tmp_path: Path):
    ck, out = tmp_path / "ck", tmp_path / "losses"
    rng = random.Random(0)
    during, kills, seen = 0, 0, []
    while during < LANDED and kills < MAX_KILLS:
        kills += 1
        proc = start(ck, out)  # also proves the last kill left a checkpoint that loads: it resumes from it
        during += kill_during_a_save(proc, ck, rng.randint(1, 3), rng.uniform(0.0, 0.02))
        tag = zero_ckpt.latest_tag(ck) if (ck / "latest").exists() else None
        if tag is None:  # killed during the very first save: nothing to lose yet
            continue
        seen.append(tag)
        state = zero_ckpt.consolidate(ck, tag)  # every byte read and checked against its CRC
        assert state and all(t.isfinite().all() for t in state.values())
        for directory in ck.iterdir():
            if directory.is_dir() and ".partial-" not in directory.name:  # a tag directory is always whole
                zero_ckpt.consolidate(ck, directory.name)
            elif ".partial-" in directory.name:
                with pytest.raises(CheckpointError, match=r"bad checkpoint tag|partial"):
                    zero_ckpt.consolidate(ck, directory.name)
    print(f"{during} of {kills} kills landed while a save was being written; latest after each: {seen}")
    assert during >= LANDED, f"only {during} of {kills} kills landed while a save was being written"
    steps = [int(t.removeprefix("step")) for t in seen]
    assert steps == sorted(steps) and len(set(steps)) > 1, f"each resume must go on from the last whole save: {seen}"
    final = subprocess.run([*ZERO, TRAIN, "--stage", "2", "--steps", str(steps[-1] + 2), "--save-every", "1",
                            "--save-dir", str(ck),
                            "--resume", "--width", "2048", "--out", str(tmp_path / "final")],
                           capture_output=True, text=True, timeout=300, check=False)
    assert final.returncode == 0, final.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "final.rank0").read_text().splitlines()]
    assert [r["step"] for r in records] == [steps[-1] + 1, steps[-1] + 2]  # it resumed from latest
    assert not list(ck.glob("*.partial-*")), "the next save should have swept the partial ones"
    assert zero_ckpt.latest_tag(ck) == f"step{steps[-1] + 2}"
