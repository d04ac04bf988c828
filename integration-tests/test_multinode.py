"""Multi-node, simulated on one machine: two `zero run` launchers, one per "node", meet through a
c10d rendezvous on 127.0.0.1 and train the demo GPT together (2 nodes x 1 rank)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_launchers_train_the_demo_together(tmp_path):
    port = free_port()
    out = tmp_path / "demo"
    nodes = []
    for node in range(2):
        cmd = [sys.executable, "-m", "zero_all", "run", "--nnodes", "2", "--nproc", "1", "--node-rank", str(node),
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "zero-multinode-test",
               str(ROOT / "examples" / "train_gpt.py"), "--deepspeed_config", str(ROOT / "examples" / "ds_config.json"),
               "--steps", "30", "--layers", "2", "--width", "64", "--sample-chars", "40", "--expect", "0",
               "--out", str(out)]
        log = open(tmp_path / f"node{node}.log", "w")  # noqa: SIM115 -- closed below
        nodes.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                       env={**os.environ, "OMP_NUM_THREADS": "1"}), log))
    deadline = time.monotonic() + 300
    try:
        for proc, _ in nodes:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc, log in nodes:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its ranks
                proc.wait()
            log.close()
    logs = [(tmp_path / f"node{n}.log").read_text() for n in range(2)]
    for node, (proc, _) in enumerate(nodes):
        assert proc.returncode == 0, f"node {node} exited {proc.returncode}:\n{logs[node][-4000:]}"
    # c10d hands out global ranks in arrival order: whichever node got rank 0 reports the world
    assert "2 ranks" in logs[0] + logs[1], logs[0][-2000:] + logs[1][-2000:]
    assert (out / "loss.png").exists() or (out / "losses.csv").exists()
    assert any((out / "checkpoints").iterdir())
