"""The ``zero`` command: run launches real ranks (one node and two simulated nodes), report describes
this machine, ckpt export writes the trained weights, and a user's mistake is one line and exit 2."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zero_all
from zero_all._cli import main
from zero_all._cli._run import HostfileError, parse_hostfile, plan_launch
from zero_comm.testing import run_ranks

ZERO = [sys.executable, "-m", "zero_all"]


def zero(*args: str, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ZERO, *args], check=False, capture_output=True, text=True, timeout=timeout,
                          cwd=cwd)


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``zero ARGS`` in this process (the code the subprocess runs, without its second of start-up)."""
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse's --help and usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_nodes(script: Path, *script_args: str, nnodes: int = 2, nproc: int = 1, timeout: float = 120,
              env: dict[str, str] | None = None) -> list[subprocess.CompletedProcess[str]]:
    """Start ``zero run`` once per simulated node on this machine, all meeting at one c10d endpoint;
    wait for all of them (at most ``timeout`` seconds, then kill every process they started).

    Reusable for any multi-node test: each node is a process group of its own, so a timeout kills its
    launcher and its ranks and nothing outlives the call."""
    endpoint = f"127.0.0.1:{free_port()}"
    rdzv_id = f"test-{os.getpid()}-{endpoint.rsplit(':', 1)[1]}"
    procs = [subprocess.Popen([*ZERO, "run", "--nnodes", str(nnodes), "--nproc", str(nproc), "--rdzv-endpoint",
                               endpoint, "--rdzv-id", rdzv_id, "--node-rank", str(node), str(script),
                               *script_args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                              env={**os.environ, **(env or {})})
             for node in range(nnodes)]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{nnodes} nodes did not finish within {timeout}s")
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):  # the launcher's group: it and every rank it started
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    return results


# -- run ------------------------------------------------------------------------------------------
RANK_FILES = """
import os, sys
assert os.environ["WORLD_SIZE"] == "2", os.environ["WORLD_SIZE"]
rank = os.environ["RANK"]
open(os.path.join(sys.argv[1], f"rank{rank}.txt"), "w").write(" ".join(sys.argv[2:]))
"""

FAIL_ON_RANK_1 = """
import os, sys
if os.environ["RANK"] == "1":
    sys.exit(3)
"""

SLEEP = """
import os, sys, time
open(os.path.join(sys.argv[1], f"pid{os.environ['RANK']}"), "w").write(str(os.getpid()))
time.sleep(120)
"""

ALL_REDUCE = """
import sys, torch, zero_comm
comm = zero_comm.init_distributed()
t = torch.tensor([comm.rank + 1.0])
comm.all_reduce(t)
assert comm.world_size == 2 and t.item() == 3.0, (comm.world_size, t.item())
open(f"{sys.argv[1]}/node{comm.rank}.ok", "w").write(str(t.item()))
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_run_starts_two_ranks_and_passes_the_script_its_arguments(tmp_path: Path):
    script = write(tmp_path, "job.py", RANK_FILES)
    done = zero("run", "--nproc", "2", str(script), str(tmp_path), "--lr", "0.1")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.glob("rank*.txt")) == ["rank0.txt", "rank1.txt"]
    assert (tmp_path / "rank1.txt").read_text() == "--lr 0.1"


def test_run_exits_with_the_failing_scripts_code(tmp_path: Path):
    done = zero("run", "--nproc", "2", str(write(tmp_path, "fail.py", FAIL_ON_RANK_1)))
    assert done.returncode == 3, done.stderr
    assert "rank 1 exited with code 3" in done.stderr


def test_sigterm_to_zero_run_stops_every_rank(tmp_path: Path):
    script = write(tmp_path, "sleep.py", SLEEP)
    launcher = subprocess.Popen([*ZERO, "run", "--nproc", "2", str(script), str(tmp_path)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("pid*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)  # both pid files complete
        ranks = [int(p.read_text()) for p in tmp_path.glob("pid*")]
        assert len(ranks) == 2, "the ranks did not start"
        launcher.send_signal(signal.SIGTERM)
        _, err = launcher.communicate(timeout=60)
        assert launcher.returncode == 128 + signal.SIGTERM, err
        assert "interrupted by SIGTERM" in err
        for pid in ranks:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()


def test_run_on_two_simulated_nodes_all_reduces_across_them(tmp_path: Path):
    script = write(tmp_path, "allreduce.py", ALL_REDUCE)
    nodes = run_nodes(script, str(tmp_path), timeout=120)
    for node, done in enumerate(nodes):
        assert done.returncode == 0, f"node {node}:\n{done.stderr[-3000:]}"
    assert sorted(p.name for p in tmp_path.glob("node*.ok")) == ["node0.ok", "node1.ok"]


def test_hostfile_sets_nodes_and_ranks_and_bad_lines_are_named(tmp_path: Path):
    good = write(tmp_path, "hosts", "# two nodes\nworker-0 slots=4\nworker-1 slots=4  # second\n\n")
    assert parse_hostfile(good) == [("worker-0", 4), ("worker-1", 4)]
    plan = plan_launch(nproc=None, nnodes=None, node_rank=1, master_addr=None, master_port=None,
                       rdzv_endpoint=None, rdzv_id=None, hostfile=str(good))
    assert (plan.nnodes, plan.nproc, plan.rendezvous, plan.endpoint) == (2, 4, "static", "worker-0:29500")
    for text, what in [("worker-0 slots=4\nworker-1 slots=four\n", "line 2: slots must be a positive integer"),
                       ("worker-0 slots=4\nworker-1\n", "line 2: 'worker-1' has no 'slots=N'"),
                       ("worker-0 slots=4 extra\n", "line 1: expected 'host slots=N'"),
                       ("a slots=2\nb slots=4\n", "every host must have the same slots"),
                       ("# nothing\n", "names no hosts")]:
        with pytest.raises(HostfileError, match=what):
            parse_hostfile(write(tmp_path, "bad", text))
    done = zero("run", "--hostfile", str(write(tmp_path, "bad", "w0 slots=2\nw1 slots=x\n")), str(good))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "line 2" in done.stderr


def test_run_refuses_options_that_do_not_fit_together(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    script = write(tmp_path, "job.py", RANK_FILES)
    for args, what in [(["--nnodes", "2"], "2 nodes need a rendezvous"),
                       (["--rdzv-endpoint", "nohost", "--nnodes", "2"], "HOST:PORT"),
                       (["--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:1"], "needs --rdzv-id"),
                       (["--nproc", "0"], "must be >= 1"),
                       (["--node-rank", "3", "--nnodes", "2", "--master-addr", "h"], "outside 0..1")]:
        code, _, err = cli(capsys, "run", *args, str(script))
        assert code == 2 and what in err, (args, err)
        assert err.strip().count("\n") == 0
    code, _, err = cli(capsys, "run", str(tmp_path / "missing.py"))
    assert code == 2 and "does not exist" in err


RESTART_ONCE = """
import os, sys
marker = os.path.join(sys.argv[1], f"tried{os.environ['RANK']}")
if os.environ["RANK"] == "0" and not os.path.exists(marker):
    open(marker, "w").close()
    sys.exit(5)
open(os.path.join(sys.argv[1], f"done{os.environ['RANK']}"), "w").write(os.environ["TORCHELASTIC_RESTART_COUNT"])
"""


@pytest.mark.timeout(120)
def test_run_a_module_with_torchruns_restarts_and_the_scripts_own_nproc(tmp_path: Path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "train.py").write_text(textwrap.dedent(RANK_FILES))
    done = zero("run", "--nproc", "2", "-m", "pkg.train", str(tmp_path), "--nproc", "3", "--nnodes=4", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "rank0.txt").read_text() == (tmp_path / "rank1.txt").read_text() == "--nproc 3 --nnodes=4"
    # torchrun's own --max-restarts (and DeepSpeed's --num_gpus): rank 0 fails once, the restart succeeds
    script = write(tmp_path, "restart.py", RESTART_ONCE)
    done = zero("run", "--num_gpus", "2", "--max-restarts", "1", "--monitor_interval", "0.1", str(script),
                str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "done0").read_text() == (tmp_path / "done1").read_text() == "1"


def test_run_refuses_what_neither_zero_nor_torchrun_takes_and_prints_the_version(capsys: pytest.CaptureFixture[str]):
    for args, what in [(["--nproc-per", "2", "x.py"], "unknown option --nproc-per"),
                       (["--standalone", "x.py"], "picks the rendezvous itself"),
                       (["-m"], "needs a module name"), (["--nproc", "2"], "give the script")]:
        code, _, err = cli(capsys, "run", *args)
        assert code == 2 and what in err and err.strip().count("\n") == 0, (args, err)
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"zero-all {zero_all.__version__}"


def test_plan_a_model_of_the_current_directory_with_factory_arguments():
    examples = Path(__file__).resolve().parents[3] / "examples"
    script = Path(sysconfig.get_path("scripts")) / "zero"
    command = [str(script)] if script.exists() else [sys.executable, "-I", "-m", "zero_all"]  # -I: cwd not on path
    def plan(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*command, "plan", "--world-size", "2", "--stage", "3", "--json", *args], check=False,
                              capture_output=True, text=True, timeout=120, cwd=examples)

    small, big = plan("--model", "gpt:GPT"), plan("--model", "gpt:GPT", "--model-arg", "n_layer=4",
                                                  "--model-arg", '{"n_embd": 128}')
    assert small.returncode == 0 and big.returncode == 0, small.stderr + big.stderr
    assert json.loads(small.stdout)["trainable_parameters"] < json.loads(big.stdout)["trainable_parameters"]
    for args, what in [(["--model", "gpt:GPT", "--model-arg", "nlayer=4"], "unexpected keyword argument 'nlayer'"),
                       (["--model", "gptx:GPT"], "no module named 'gptx'"),
                       (["--model", "gpt:GPT", "--model-arg", "4"], "KEY=VALUE")]:
        done = plan(*args)
        assert done.returncode == 2 and what in done.stderr, (args, done.stderr)
        assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr


# -- report ---------------------------------------------------------------------------------------
def test_report_names_versions_devices_and_stores():
    done = zero("report")
    assert done.returncode == 0, done.stderr
    assert torch.__version__ in done.stdout
    for name in ("zero-comm", "zero-optim", "zero-offload", "zero-ckpt", "zero-kernels", "zero-all", "gloo",
                 "HostStore", "NVMeStore"):
        assert name in done.stdout
    report = json.loads(zero("report", "--json").stdout)
    assert report["libraries"]["torch"] == torch.__version__
    assert report["zero_packages"]["zero-all"] == zero_all.__version__
    assert report["distributed_backends"]["gloo"] is True
    assert report["devices"]["cuda_available"] == torch.cuda.is_available()
    assert report["kernels"]["cpu_tensors"] in ("torch reference", "triton")
    assert report["offload"]["nvme_store"]["usable"] is True


def test_the_console_script_is_installed():
    script = Path(sysconfig.get_path("scripts")) / "zero"
    if not script.exists():
        pytest.skip(f"the console script is not installed at {script} (pip install -e packages/zero-all)")
    done = subprocess.run([str(script), "--help"], check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "plan" in done.stdout and "ckpt" in done.stdout


def test_help_and_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]):
    assert zero("--help").returncode == 0
    for args in (["run", "--help"], ["report", "--help"], ["plan", "--help"], ["ckpt", "export", "-h"]):
        code, out, _ = cli(capsys, *args)
        assert code == 0 and "usage: zero" in out, args
    done = zero("plan", "--params", "-3", "--world-size", "2")
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    for args in (["frobnicate"], ["plan", "--world-size", "2"], ["plan", "--model", "no_such_module:f",
                                                               "--world-size", "2"], ["ckpt"], []):
        code, _, err = cli(capsys, *args)
        assert code == 2, args
        if args not in (["ckpt"], []):  # no command: the help, exit 2
            assert err.strip().count("\n") == 0, err


def test_plan_models_parameter_offload_from_the_flag_and_the_config(capsys: pytest.CaptureFixture[str],
                                                                     tmp_path: Path):
    code, out, _ = cli(capsys, "plan", "--params", "1e9", "--world-size", "8", "--offload-param", "cpu", "--json")
    assert code == 0
    (only,) = json.loads(out)["plans"]  # stage 3 with the optimizer in the same (host) store, by default
    assert (only["stage"], only["offload"], only["offload_param"]) == (3, "cpu", "cpu")
    assert only["host"]["parameter + gradient shards"] > 0 and only["device"]["parameters"] == 0
    config = tmp_path / "ds.json"
    zero_block = {"stage": 3, "offload_param": {"device": "cpu"}, "offload_optimizer": {"device": "cpu"}}
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero_block}))
    code, out, _ = cli(capsys, "plan", "--params", "1e9", "--world-size", "8", "--config", str(config))
    assert code == 0 and "stage 3 +cpu +params" in out and "host: parameter + gradient shards" in out
    # one store: parameters on NVMe take the optimizer state there too, as the engine does
    zero_block["offload_param"] = {"device": "nvme", "nvme_path": str(tmp_path)}
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero_block}))
    code, out, _ = cli(capsys, "plan", "--params", "1e9", "--world-size", "8", "--config", str(config))
    assert code == 0 and "stage 3 +nvme +params" in out and "NVMe per rank" in out
    # wrong combinations: one line each, naming what is wrong
    del zero_block["offload_optimizer"]
    zero_block["offload_param"] = {"device": "cpu"}
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero_block}))
    for args, message in ((["--config", str(config)], "needs offload_optimizer.device 'cpu'"),
                          (["--offload-param", "cpu", "--stage", "2", "3"], "needs stage 3, got stage 2"),
                          (["--offload-param", "nvme", "--offload", "cpu"], "needs --offload nvme")):
        code, _, err = cli(capsys, "plan", "--params", "1e9", "--world-size", "8", *args)
        assert code == 2 and message in err and err.strip().count("\n") == 0, (args, err)


# -- ckpt export ----------------------------------------------------------------------------------
def small_model() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 48), nn.Tanh(), nn.Linear(48, 48), nn.Tanh(), nn.Linear(48, 4))


def train_and_save(root: str) -> dict[str, torch.Tensor]:
    """Two stage-3 steps on every rank, saved; returns the gathered weights (rank 0)."""
    torch.manual_seed(0)
    config = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 100}}
    engine, _, _, _ = zero_all.initialize(model=small_model(), config=config)
    g = torch.Generator().manual_seed(engine.comm.rank)
    for _ in range(2):
        x = torch.randn(4, 16, generator=g)
        engine.backward(F.cross_entropy(engine(x), x[:, :4].argmax(1)))
        engine.step()
    engine.save_checkpoint(root)
    return engine.optimizer.consolidated_state_dict()  # type: ignore[attr-defined]


def test_ckpt_export_writes_the_trained_weights(tmp_path: Path):
    gathered = run_ranks(train_and_save, 2, str(tmp_path / "ckpt"))[0]
    out = tmp_path / "model.pt"
    done = zero("ckpt", "export", str(tmp_path / "ckpt"), str(out))
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stderr
    fresh = small_model()
    fresh.load_state_dict(torch.load(out, weights_only=True))
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, gathered[name]), name
    tag = zero("ckpt", "export", str(tmp_path / "ckpt"), str(tmp_path / "t.pt"), "--tag", "global_step2")
    assert tag.returncode == 0, tag.stderr


def test_ckpt_export_of_what_is_not_a_checkpoint_is_one_line_and_exit_2(tmp_path: Path):
    for target in (tmp_path / "missing", tmp_path):
        done = zero("ckpt", "export", str(target), str(tmp_path / "out.pt"))
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "out.pt").exists()


def test_the_launchers_one_line_errors_name_classes_that_exist():
    import importlib

    from zero_all._cli._rank import USER_ERRORS

    for qualified in USER_ERRORS:  # matched by name in the rank's output: a moved class would print a traceback
        module, _, name = qualified.rpartition(".")
        cls = getattr(importlib.import_module(module), name, None)
        assert isinstance(cls, type) and issubclass(cls, Exception), f"{qualified} is not an exception class"
        assert f"{cls.__module__}.{cls.__qualname__}" == qualified, f"{qualified} is really {cls.__module__}"
