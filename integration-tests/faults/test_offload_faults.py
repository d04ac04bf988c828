"""NVMe offload when its path is missing, unwritable or too small, and when a rank dies: the path is
created as DeepSpeed does, a bad one is an error before the first step, and no swap file outlives the
job. fp16 overflow on one rank only: every rank skips that step and moves its scale alike."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_disk import in_namespace, needs_mounts

TRAIN = str(Path(__file__).with_name("train.py"))
ZERO = [sys.executable, "-m", "zero_all", "run", "--nproc", "2"]
pytestmark = pytest.mark.timeout(300)


def train(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ZERO, TRAIN, *args], capture_output=True, text=True, timeout=timeout, check=False)


def records(out: Path, rank: int = 0) -> list[dict]:
    path = Path(f"{out}.rank{rank}")
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_missing_nvme_path_is_created_and_left_without_swap_files(tmp_path: Path):
    nvme, out = tmp_path / "not" / "yet" / "nvme", tmp_path / "o"
    run = train("--steps", "3", "--offload", "nvme", "--nvme-path", str(nvme), "--out", str(out), "--resources")
    assert run.returncode == 0, run.stderr[-3000:]
    assert all(r["swap_files"] > 0 for r in records(out)), "the state was not swapped to the created path"
    assert nvme.is_dir() and not list(nvme.iterdir())


def test_an_nvme_path_that_cannot_be_created_fails_before_the_first_step(tmp_path: Path):
    out = tmp_path / "o"
    run = train("--steps", "3", "--offload", "nvme", "--nvme-path", "/proc/zero-nvme", "--out", str(out))
    assert run.returncode == 1 and not records(out), "it must fail before any step"
    assert "NVMe offload path /proc/zero-nvme does not exist and cannot be created" in run.stderr, run.stderr[-3000:]


@needs_mounts
def test_an_nvme_path_too_small_for_the_swap_files_fails_before_the_first_step(tmp_path: Path):
    disk, out = tmp_path / "disk", tmp_path / "o"
    run = in_namespace(disk, "1m", f"{' '.join(ZERO)} {TRAIN} --steps 3 --offload nvme --nvme-path {disk} "
                                   f"--width 1024 --out {out}; echo \"exit $?\"")
    assert run.stdout.split() == ["exit", "1"] and not records(out), run.stdout + run.stderr[-3000:]
    assert "free; the offloaded state needs" in run.stderr, run.stderr[-3000:]


@pytest.mark.parametrize("dying", ["1", "-1"], ids=["rank1", "every-rank"])
def test_ranks_killed_mid_step_with_nvme_offload_fail_fast_and_leave_no_swap_files(tmp_path: Path, dying: str):
    nvme, out = tmp_path / "nvme", tmp_path / "o"
    began = time.monotonic()
    run = train("--steps", "6", "--offload", "nvme", "--nvme-path", str(nvme), "--die-step", "3",
                "--poison-rank", dying, "--out", str(out), "--resources", timeout=120)
    took = time.monotonic() - began
    print(f"rank {dying} SIGKILLed in step 4 with NVMe offload: the job ended in {took:.1f} s")
    assert run.returncode != 0 and took < 60
    assert "SIGKILL" in run.stderr and (dying == "-1" or "rank 1" in run.stderr), run.stderr[-3000:]
    assert [r["step"] for r in records(out, 1)] == [1, 2, 3] and records(out, 1)[-1]["swap_files"] > 0
    # with every rank killed none could clean up: zero run removed what their stores registered
    assert not list(nvme.glob("zero-swap-*")), f"swap files left behind: {list(nvme.rglob('*'))}"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_an_fp16_overflow_on_one_rank_skips_the_step_on_every_rank_alike(tmp_path: Path, stage: int):
    out = tmp_path / "o"
    run = train("--stage", str(stage), "--steps", "8", "--fp16", "--poison-step", "2", "--poison-rank", "1",
                "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [records(out, r) for r in (0, 1)]
    for r in ranks:
        assert [x["applied"] for x in r] == [True, True, False, True, True, True, True, True]
        assert [x["scale"] for x in r] == [256, 256, 128, 128, 128, 128, 256, 256]
        assert r[2]["weight"] == r[1]["weight"], "the skipped step moved the weights"
    if stage < 3:  # whole weights on every rank: identical
        assert [x["weight"] for x in ranks[0]] == [x["weight"] for x in ranks[1]]
