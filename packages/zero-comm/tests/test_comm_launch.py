"""init_distributed joins the job from each launcher's environment, or makes a world of one."""

import os
import socket
import subprocess
import sys
import textwrap

import pytest

import zero_comm
from zero_comm import LaunchEnv, detect_launch_env, expand_slurm_nodelist
from zero_comm.testing import run_ranks


def test_torchrun_variables():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.2", "MASTER_PORT": "1234"}
    assert detect_launch_env(env) == LaunchEnv(3, 8, 1, "10.0.0.2", 1234, "torchrun")


def test_slurm_variables_pick_the_first_node_as_master():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "gpu[07-08,11],login1", "SLURM_JOB_ID": "123456"}
    launch = detect_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.launcher) == (5, 16, 1, "slurm")
    assert launch.master_addr == "gpu07"
    assert launch.master_port == 20000 + 123456 % 20000
    assert detect_launch_env({**env, "MASTER_PORT": "777"}).master_port == 777


def test_slurm_nodelist_expansion():
    assert expand_slurm_nodelist("node1") == ["node1"]
    assert expand_slurm_nodelist("a[1-3],b") == ["a1", "a2", "a3", "b"]
    assert expand_slurm_nodelist("gpu[009-011,20]") == ["gpu009", "gpu010", "gpu011", "gpu20"]
    assert expand_slurm_nodelist("r[1-2]-n[1-2]") == ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]
    with pytest.raises(ValueError, match="not 'low-high'"):
        expand_slurm_nodelist("gpu[5-2]")


def test_openmpi_variables():
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
    assert detect_launch_env(env) == LaunchEnv(1, 4, 1, "127.0.0.1", 29500, "openmpi")
    with pytest.raises(ValueError, match="set MASTER_ADDR"):
        detect_launch_env({**env, "OMPI_COMM_WORLD_LOCAL_SIZE": "2"})


def test_no_environment_is_a_world_of_one():
    assert detect_launch_env({}) == LaunchEnv(0, 1, 0, "127.0.0.1", 29500, "single")


@pytest.mark.parametrize("env, message", [
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "rank 2 is outside a world of size 2"),
    ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "70000"}, "not a TCP port"),
])
def test_bad_launch_environment_is_named(env, message):
    with pytest.raises(ValueError, match=message):
        detect_launch_env(env)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RANK_SCRIPT = textwrap.dedent("""
    import torch, zero_comm
    comm = zero_comm.init_distributed()
    again = zero_comm.init_distributed()          # idempotent
    t = torch.tensor([comm.rank + 1.0])
    again.all_reduce(t)
    import os
    print(f"rank={comm.rank} world={comm.world_size} sum={t.item():g} backend={comm.backend}", flush=True)
""")


def _run(cmd, env, timeout=90):
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_", "OMPI_"))}
    return subprocess.Popen(cmd, env={**clean, "OMP_NUM_THREADS": "1", **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _outputs(procs, timeout=90):
    out = []
    try:
        for p in procs:
            text, _ = p.communicate(timeout=timeout)
            assert p.returncode == 0, text
            out.append(text)
    finally:
        for p in procs:
            p.kill()
    return out


def test_plain_process_is_a_world_of_one():
    (text,) = _outputs([_run([sys.executable, "-c", RANK_SCRIPT], {})])
    assert "rank=0 world=1 sum=1 backend=gloo" in text


def test_real_torchrun_launch():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "--no-python", sys.executable, "-c", RANK_SCRIPT]
    (text,) = _outputs([_run(cmd, {})])
    assert "rank=0 world=2 sum=3" in text and "rank=1 world=2 sum=3" in text


@pytest.mark.parametrize("launcher", ["slurm", "openmpi"])
def test_real_launch_from_scheduler_variables(launcher):
    port, world = str(_free_port()), 2
    procs = []
    for rank in range(world):
        if launcher == "slurm":
            env = {"SLURM_PROCID": str(rank), "SLURM_NTASKS": str(world), "SLURM_LOCALID": str(rank),
                   "SLURM_JOB_NODELIST": "localhost", "MASTER_PORT": port}
        else:
            env = {"OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_SIZE": str(world),
                   "OMPI_COMM_WORLD_LOCAL_RANK": str(rank), "OMPI_COMM_WORLD_LOCAL_SIZE": str(world),
                   "MASTER_PORT": port}
        procs.append(_run([sys.executable, "-c", RANK_SCRIPT], env))
    texts = _outputs(procs)
    assert [f"rank={r} world=2 sum=3" in t for r, t in enumerate(texts)] == [True, True]


def test_switching_backend_after_init_is_refused():
    run_ranks(check_backend_switch, 1)


def check_backend_switch() -> None:
    with pytest.raises(zero_comm.CommError, match="cannot switch"):
        zero_comm.init_distributed("nccl")


# A process that made a torch optimizer after joining (its first add_param_group imports
# torch._dynamo, which imports torch.distributed.nn.functional) must still be able to tear
# the world down at exit: if the backend outlives the exit hook, its worker threads run into
# interpreter shutdown, and one releasing a finished collective's tensors there aborts the
# process ("terminate called without an active exception", SIGABRT).
EXIT_SCRIPT = textwrap.dedent("""
    import atexit, os, torch, zero_comm

    def backend_threads():  # runs after zero-comm's exit hook (atexit is last in, first out)
        names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
        print("backend threads at exit:", sorted(n for n in names if "gloo" in n), flush=True)

    atexit.register(backend_threads)
    comm = zero_comm.init_distributed()
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    comm.all_gather(torch.ones(2), async_op=True).wait()
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="lists threads through /proc")
def test_exit_tears_the_backend_down_after_a_torch_optimizer_was_made():
    (text,) = _outputs([_run([sys.executable, "-c", EXIT_SCRIPT], {})])
    assert "backend threads at exit: []" in text, text
