"""A disk that fills up or turns read-only under a save: one clear error on every rank, the previous
checkpoint intact and still named by ``latest``, the partial save's space given back. The small and
read-only filesystems are real: a tmpfs of a chosen size mounted in a private mount namespace
(``unshare --user --map-root-user --mount``), which needs no privileges where user namespaces are on."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TRAIN = str(Path(__file__).with_name("train.py"))
ZERO = f"{sys.executable} -m zero_all run --nproc 2"
pytestmark = pytest.mark.timeout(300)


def namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True, timeout=30, check=False)
    return probe.returncode == 0


needs_mounts = pytest.mark.skipif(not namespaces_work(), reason="no unprivileged mount namespaces here "
                                  "(unshare --user --map-root-user --mount): cannot make a small or read-only disk")


def in_namespace(disk: Path, size: str, shell: str) -> subprocess.CompletedProcess[str]:
    """Run ``shell`` with a ``size`` tmpfs mounted at ``disk`` (visible to it and its children only)."""
    disk.mkdir()
    script = f"set -u; mount -t tmpfs -o size={size} tmpfs {disk}\n" + textwrap.dedent(shell)
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                          capture_output=True, text=True, timeout=240, check=False)


UNEVEN = """
import json, sys, torch, zero_comm, zero_ckpt
from zero_ckpt import CheckpointError, CheckpointManager, FullTensor
from zero_comm.testing import run_ranks

class Piece:
    def __init__(self, start, stop, data):
        self.start, self.stop, self.data = start, stop, data

def state(rank, n, value):
    # rank 0 holds one element, rank 1 the rest: the free-space check (a rank's share times the ranks)
    # passes, and rank 1 runs out of space halfway through writing
    start, stop = (0, 1) if rank == 0 else (1, n)
    return {"w": FullTensor((n,), torch.float32, [Piece(start, stop, torch.full((stop - start,), value))])}

def job(root):
    comm = zero_comm.init_distributed()
    manager = CheckpointManager(root, comm)
    manager.save("good", {"m": state(comm.rank, 250_000, 1.0)})  # 1 MB
    try:
        manager.save("big", {"m": state(comm.rank, 2_500_000, 2.0)})  # 10 MB: more than the disk
        error = None
    except CheckpointError as exc:
        error = str(exc)
    mine = state(comm.rank, 250_000, 0.0)
    manager.load({"m": mine})  # latest
    import pathlib, shutil
    return {"error": error, "latest": zero_ckpt.latest_tag(root), "loaded": bool((mine["w"].pieces[0].data == 1).all()),
            "left": sorted(p.name for p in pathlib.Path(root).iterdir()), "free": shutil.disk_usage(root).free}

if __name__ == "__main__":
    print(json.dumps(run_ranks(job, 2, sys.argv[1])))
"""


@needs_mounts
def test_a_disk_filling_up_mid_save_is_one_error_naming_the_rank_and_loses_nothing(tmp_path: Path):
    (tmp_path / "uneven.py").write_text(UNEVEN)
    disk = tmp_path / "disk"
    run = in_namespace(disk, "6m", f"{sys.executable} {tmp_path / 'uneven.py'} {disk}")
    assert run.returncode == 0, run.stderr[-3000:]
    records = json.loads(run.stdout.strip().splitlines()[-1])
    for r in records:
        # rank 1 fills the disk; rank 0, writing its small files after that, may run out of space too
        assert r["error"] and r["error"].startswith("checkpoint big was not saved ("), r["error"]
        assert "rank 1: [Errno 28] No space left on device" in r["error"], r["error"]
        assert "still names the previous one" in r["error"], r["error"]
        assert r["latest"] == "good" and r["loaded"], r
        assert r["left"] == ["good", "latest"], "the partial save's files were not removed"
        assert r["free"] > 4 << 20, "the space the partial save took was not given back"


@needs_mounts
def test_too_little_space_for_a_save_is_refused_before_writing(tmp_path: Path):
    disk, out = tmp_path / "disk", tmp_path / "o"
    ck = disk / "ck"
    run = in_namespace(disk, "20m", f"""
        {ZERO} {TRAIN} --steps 4 --save-every 2 --save-dir {ck} --width 1024 --out {out}
        echo "exit $?"
        ls {ck}
        {ZERO} {TRAIN} --steps 2 --save-dir {ck} --resume --width 1024 --out {out}.resumed
        echo "exit $?"
        """)
    lines = run.stdout.split()
    assert lines[:5] == ["exit", "1", "latest", "step2", "exit"] and lines[5] == "0", run.stdout + run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if "no space for checkpoint step4" in line]
    assert errors and "free and it needs about" in errors[0], run.stderr[-3000:]
    assert "Traceback" not in run.stderr


@needs_mounts
def test_a_read_only_checkpoint_directory_is_one_error_and_the_last_checkpoint_still_loads(tmp_path: Path):
    disk, out = tmp_path / "disk", tmp_path / "o"
    ck = disk / "ck"
    run = in_namespace(disk, "64m", f"""
        {ZERO} {TRAIN} --steps 2 --save-every 2 --save-dir {ck} --width 256 --out {out}
        mount -o remount,ro {disk}
        {ZERO} {TRAIN} --steps 4 --save-every 2 --save-dir {ck} --resume --width 256 --out {out}.ro
        echo "exit $?"
        {ZERO} {TRAIN} --steps 3 --save-dir {ck} --resume --width 256 --out {out}.after
        echo "exit $?"
        """)
    assert run.stdout.split() == ["exit", "1", "exit", "0"], run.stdout + run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if "cannot write checkpoints to" in line]
    assert errors and "Read-only file system" in errors[0], run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    after = [json.loads(line) for line in Path(f"{out}.after.rank0").read_text().splitlines()]
    assert [r["step"] for r in after] == [3]  # resumed from step2, the checkpoint written before
