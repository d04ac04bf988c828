"""Training step time of ZeRO stages 0-3 and ZeRO-Offload against torch DDP and FSDP2, in one run.

    python benchmarks/zero_step.py [--world-size 2] [--rounds 4] [--steps 3] [--dir /tmp] [--out benchmarks/results]

On ``world_size`` Gloo ranks, a ~20M-parameter GPT is trained (fp32, AdamW) nine
ways: torch ``DistributedDataParallel`` with ``torch.optim.AdamW`` -- the baseline --,
zero's ``ZeroOptimizer`` at stages 0, 1 and 2, zero's ``ZeroStage3`` (its default gather
units -- one per transformer block here -- and, as ``zero-3-modules``, one unit per module
as DeepSpeed gathers), stage 3 with the optimizer offloaded to host
memory (``HostStore``) and to files (``NVMeStore`` under ``--dir``, O_DIRECT where the
file system allows it), and PyTorch FSDP2 (``fully_shard`` on every block and on the
model, ``torch.optim.AdamW``), the peer stage 3 is measured against. Each way has its
own copy of the model; the ways take turns, ``steps`` timed steps each, for ``rounds``
rounds, so drift on a shared machine hits all of them alike. A step is forward,
backward and optimizer step of one micro-batch per rank; the slowest rank's time
counts. One more step per zero way, untimed, is read from zero-comm's ledger: the
bytes its collectives put on one rank's link (bus bytes), against ZeRO's volume
formula (stages 0-2: 2Ψ elements, as an all-reduce; stage 3: 3Ψ, two gathers and a
reduce-scatter; each times (N-1)/N and 4 bytes). On one CPU machine "offloading" moves
state between two kinds of host memory (or to a file): the ratios price the
bookkeeping and the file I/O, not a PCIe link.

Writes ``zero_step.json`` and ``zero_step.png``. Targets: stages 1 and 2 within 1.05x
DDP; stage 3 within 1.3x DDP and no slower than FSDP2; stage 3 with CPU offload within
1.3x DDP, with NVMe offload within 1.5x.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _common import goal, pyplot, table, write_results
from torch.nn.parallel import DistributedDataParallel

import zero_comm
from zero_comm.testing import run_ranks
from zero_offload import HostStore, NVMeStore
from zero_optim import AdamW, ZeroConfig, ZeroOptimizer, ZeroStage3

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from gpt import GPT, GPTConfig

CONFIG = GPTConfig(vocab_size=8192, block_size=64, n_layer=10, n_head=6, n_embd=384)
WAYS = ("ddp", "zero-0", "zero-1", "zero-2", "zero-3", "zero-3-modules", "zero-3-cpu", "zero-3-nvme", "fsdp2")
GOALS = {"zero-1": 1.05, "zero-2": 1.05, "zero-3": 1.3, "zero-3-cpu": 1.3, "zero-3-nvme": 1.5}
STAGE = {"zero-0": 0, "zero-1": 1, "zero-2": 2, "zero-3": 3, "zero-3-modules": 3, "zero-3-cpu": 3, "zero-3-nvme": 3}


def _batch(step: int, rank: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step * 1000 + rank)
    seq = torch.randint(0, CONFIG.vocab_size, (micro, CONFIG.block_size + 1), generator=g)
    return seq[:, :-1], seq[:, 1:]


def _torch_trainer(model: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        model(x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _trainer(way: str, model: GPT, comm: zero_comm.Communicator, files: Path) -> Callable[..., None]:
    if way == "ddp":
        return _torch_trainer(DistributedDataParallel(model))
    if way == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (comm.world_size,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        return _torch_trainer(fully_shard(model, mesh=mesh))
    zopt: ZeroOptimizer | ZeroStage3
    if way.startswith("zero-3"):
        store = {"zero-3-cpu": HostStore,
                 "zero-3-nvme": lambda: NVMeStore(files / f"rank{comm.rank}", buffer_bytes=256 << 20)}.get(way)
        config = ZeroConfig(stage=3, unit_numel=0) if way == "zero-3-modules" else ZeroConfig(stage=3)
        zopt = ZeroStage3(model, AdamW(lr=1e-4), comm=comm, config=config,
                          store=store() if store else None)
    else:
        zopt = ZeroOptimizer(model.parameters(), AdamW(lr=1e-4), comm=comm,
                             config=ZeroConfig(stage=STAGE[way], bucket_numel=1 << 22))

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        zopt.backward(model(x, y))
        zopt.step()
    return step


def theory_bus_bytes(way: str, params: int, world: int) -> float:
    """ZeRO's communication volume per rank per step, fp32: 2Ψ (stages 0-2) or 3Ψ (stage 3) elements."""
    return (3 if STAGE[way] == 3 else 2) * params * 4 * (world - 1) / world


def measure(rounds: int, steps: int, micro: int, files: Path) -> dict:
    comm = zero_comm.init_distributed()
    trainers = {}
    for way in WAYS:
        torch.manual_seed(0)
        trainers[way] = _trainer(way, GPT(CONFIG), comm, files)
    params = sum(p.numel() for p in GPT(CONFIG).parameters())
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    bus: dict[str, float] = {}
    for way, step in trainers.items():  # warm up every way once; one more step read from the ledger
        step(*_batch(0, comm.rank, micro))
        if way in STAGE:
            with comm.ledger.measure() as booked:
                step(*_batch(0, comm.rank, micro))
            bus[way] = sum(e.bus_bytes for e in booked.snapshot().values())
    for r in range(rounds):
        order = WAYS if r % 2 == 0 else WAYS[::-1]
        for way in order:
            for s in range(steps):
                x, y = _batch(r * steps + s, comm.rank, micro)
                comm.barrier()
                start = time.perf_counter()
                trainers[way](x, y)
                elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
                comm.all_reduce(elapsed, "max")
                times[way].append(elapsed.item())
        if comm.rank == 0:
            print(f"  round {r + 1}/{rounds}: " + ", ".join(
                f"{w} {statistics.median(times[w]):.3f}s" for w in WAYS), flush=True)
    return {"params": params, "times": times, "bus_bytes": bus}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where the NVMe way's files go")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    print(f"GPT {CONFIG}, {args.world_size} Gloo ranks, fp32 AdamW, micro-batch {args.micro_batch} per rank",
          flush=True)
    files = Path(tempfile.mkdtemp(prefix="zero-step-", dir=args.dir))
    try:
        result = run_ranks(measure, args.world_size, args.rounds, args.steps, args.micro_batch, files,
                           timeout=3600)[0]
    finally:
        shutil.rmtree(files, ignore_errors=True)
    medians = {way: statistics.median(t) for way, t in result["times"].items()}
    base = medians["ddp"]
    ratio = {w: medians[w] / base for w in WAYS}
    theory = {w: theory_bus_bytes(w, result["params"], args.world_size) for w in result["bus_bytes"]}
    print(f"{result['params'] / 1e6:.1f}M parameters; median step time over {args.rounds * args.steps} steps")
    print(f"{'way':<12}{'step s':>9}{'x DDP':>8}{'bus MiB':>10}{'x theory':>10}")
    for way in WAYS:
        moved = result["bus_bytes"].get(way)
        comm_cols = f"{moved / 2**20:>10.1f}{moved / theory[way]:>10.3f}" if moved is not None else ""
        print(f"{way:<12}{medians[way]:>9.3f}{ratio[way]:>8.2f}{comm_cols}")
    goals = [goal(f"{w} step time / DDP", ratio[w], g) for w, g in GOALS.items()]
    goals.append(goal("zero-3 step time / FSDP2", medians["zero-3"] / medians["fsdp2"], 1.0))
    for g in goals:
        print(f"{g['what']}: {g['value']:.2f} (goal <= {g['goal']}) {'met' if g['met'] else 'MISSED'}")
    payload = {"meta": {"world_size": args.world_size, "backend": "gloo", "precision": "fp32",
                        "params": result["params"], "torch": torch.__version__, "micro_batch": args.micro_batch,
                        "rounds": args.rounds, "steps": args.steps},
               "goals": goals, "table": table(["way", "median step (s)", "x DDP", "bus MiB/step", "x ZeRO formula"], [
                   [w, f"{medians[w]:.3f}", f"{ratio[w]:.2f}",
                    f"{result['bus_bytes'][w] / 2**20:.1f}" if w in theory else "-",
                    f"{result['bus_bytes'][w] / theory[w]:.3f}" if w in theory else "-"] for w in WAYS]),
               "median_step_s": medians, "ratio_to_ddp": ratio,
               "bus_bytes_per_step": result["bus_bytes"], "theory_bus_bytes_per_step": theory,
               "times": result["times"]}
    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    ax.bar(WAYS, [ratio[w] for w in WAYS], color=["grey"] + [f"C{i}" for i in range(len(WAYS) - 1)])
    ax.axhline(1.05, color="red", lw=0.8, label="1.05x DDP")
    ax.axhline(1.3, color="red", lw=0.8, ls="--", label="1.3x DDP")
    ax.axhline(1.5, color="red", lw=0.8, ls=":", label="1.5x DDP")
    ax.set_ylabel("step time / DDP step time")
    ax.tick_params(axis="x", labelrotation=35)
    ax.set_title(f"{result['params'] / 1e6:.0f}M-param GPT, {args.world_size} Gloo ranks, fp32 AdamW")
    ax.legend(fontsize=8)
    ways = list(theory)
    bx.bar(ways, [result["bus_bytes"][w] / theory[w] for w in ways], color="C0")
    bx.axhline(1.0, color="black", lw=0.8)
    bx.set_ylabel("bus bytes / ZeRO formula")
    bx.tick_params(axis="x", labelrotation=35)
    bx.set_title("communication per step vs theory")
    write_results(args.out, "zero_step", payload, fig)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
