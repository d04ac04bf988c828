"""How cost grows with the work: ZeRO-3 against DDP over 4 model sizes and world sizes 1, 2 and 4.

    python benchmarks/scaling.py [--worlds 1,2,4] [--layers 2,4,8,16] [--rounds 2] [--out benchmarks/results]

A GPT (examples/gpt.py, width 256, vocabulary 512) of 2, 4, 8 and 16 blocks -- each about twice the
parameters of the last -- is trained in fp32 with AdamW on ``N`` Gloo ranks, one thread each, a micro-batch
of 4 x 64 tokens per rank (weak scaling: each rank's work is the same at every ``N``). Three ways, in the
same processes:

- ``local``: each rank trains its own copy with torch alone (no communication): the compute, measured;
- ``ddp``: torch ``DistributedDataParallel``;
- ``zero-3``: zero's ``ZeroStage3``.

Memory: per rank, the bytes of the live CPU tensors (walked from the garbage collector) that a way adds
after two steps and a third backward, each way built alone, against ZeRO-3's formula 16Ψ/N (DDP holds
16Ψ at every N). Time: the ways take turns, ``rounds`` times two timed steps each, the slowest rank's time
counting; the median. On this 2-core machine 4 ranks share 2 cores, so every way slows at N=4 alike.

Goals: ZeRO-3's bytes per rank within 1.10x of 16Ψ/N at every size and N; from the smallest model to the
largest, ZeRO-3's step time grows no faster than the compute's (``local``'s) at every N (the ratio of the
two growths <= 1.0). Writes ``scaling.json`` and ``scaling.png``; one line per case.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import goal, pyplot, table, write_results
from torch.nn.parallel import DistributedDataParallel

import zero_comm
from zero_comm.testing import live_tensor_bytes, run_ranks
from zero_optim import AdamW, ZeroConfig, ZeroStage3

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from gpt import GPT, GPTConfig

MICRO, BLOCK = 4, 64
WAYS = ("local", "ddp", "zero-3")  # timed; memory is walked for the last two
HELD = ("ddp", "zero-3")


def _config(layers: int) -> GPTConfig:
    return GPTConfig(vocab_size=512, block_size=BLOCK, n_layer=layers, n_head=4, n_embd=256)


def _batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step * 1000 + rank)
    seq = torch.randint(0, 512, (MICRO, BLOCK + 1), generator=g)
    return seq[:, :-1], seq[:, 1:]


class _Way:
    """One way of training the model: ``step`` a whole step, ``backward`` only the backward."""

    def __init__(self, way: str, layers: int, comm: zero_comm.Communicator):
        torch.manual_seed(0)
        self.model = GPT(_config(layers))
        if way in ("local", "ddp"):
            self.ddp = DistributedDataParallel(self.model) if way == "ddp" else self.model
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        else:
            self.zopt = ZeroStage3(self.model, AdamW(lr=1e-4), comm=comm, config=ZeroConfig(stage=3))
        self.way = way

    def backward(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.way in ("local", "ddp"):
            self.ddp(x, y).backward()
        else:
            self.zopt.backward(self.model(x, y))

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.backward(x, y)
        if self.way in ("local", "ddp"):
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        else:
            self.zopt.step()


def measure(layers_list: list[int], rounds: int) -> list[dict]:
    comm = zero_comm.init_distributed()
    rows = []
    for layers in layers_list:
        params = sum(p.numel() for p in GPT(_config(layers)).parameters())
        held = {}
        for way in HELD:  # memory: each way alone
            gc.collect()
            before = live_tensor_bytes()
            w = _Way(way, layers, comm)
            for s in range(2):
                w.step(*_batch(s, comm.rank))
            w.backward(*_batch(2, comm.rank))
            # a gradient autograd made has no Python object until asked for: the walk would miss it
            grads = [p.grad for p in w.model.parameters() if p.grad is not None]
            held[way] = live_tensor_bytes() - before
            del grads
            del w
        ways = {way: _Way(way, layers, comm) for way in WAYS}
        times: dict[str, list[float]] = {way: [] for way in WAYS}
        for way in WAYS:
            ways[way].step(*_batch(0, comm.rank))  # warm up
        for r in range(rounds):
            for way in WAYS if r % 2 == 0 else WAYS[::-1]:
                for s in range(2):
                    x, y = _batch(1 + r * 2 + s, comm.rank)
                    comm.barrier()
                    start = time.perf_counter()
                    ways[way].step(x, y)
                    took = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
                    times[way].append(comm.all_reduce(took, "max").item())
        mem = torch.tensor([float(held[w]) for w in HELD], dtype=torch.float64)
        comm.all_reduce(mem, "max")
        row = {"layers": layers, "params": params, "world": comm.world_size,
               "step_s": {w: statistics.median(times[w]) for w in WAYS},
               "bytes": {w: mem[i].item() for i, w in enumerate(HELD)}}
        rows.append(row)
        if comm.rank == 0:
            print(f"  N={comm.world_size} {params / 1e6:5.1f}M params: " + ", ".join(
                f"{w} {row['step_s'][w]:.3f}s" + (f" {row['bytes'][w] / 2**20:.1f} MiB" if w in HELD else "")
                for w in WAYS), flush=True)
        del ways
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", default="1,2,4")
    parser.add_argument("--layers", default="2,4,8,16")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    worlds = [int(n) for n in args.worlds.split(",")]
    layers = [int(n) for n in args.layers.split(",")]
    rows = []
    for n in worlds:
        rows += run_ranks(measure, n, layers, args.rounds, timeout=3600)[0]
    goals = []
    for r in rows:
        r["formula_zero3"] = 16 * r["params"] / r["world"]
        r["memory_ratio"] = r["bytes"]["zero-3"] / r["formula_zero3"]
        r["zero3_over_ddp"] = r["step_s"]["zero-3"] / r["step_s"]["ddp"]
        goals.append(goal(f"zero-3 bytes / 16Ψ/N, {r['params'] / 1e6:.1f}M params, N={r['world']}",
                          r["memory_ratio"], 1.10))
    for n in worlds:
        mine = sorted((r for r in rows if r["world"] == n), key=lambda r: r["params"])
        small, large = mine[0], mine[-1]
        compute = large["step_s"]["local"] / small["step_s"]["local"]
        growth = large["step_s"]["zero-3"] / small["step_s"]["zero-3"]
        goals.append(goal(f"zero-3 step time growth / compute growth, {small['params'] / 1e6:.1f}M -> "
                          f"{large['params'] / 1e6:.1f}M, N={n}", growth / compute, 1.0))
    for g in goals:
        print(f"{g['what']}: {g['value']:.3f} (goal <= {g['goal']}) {'met' if g['met'] else 'MISSED'}")
    payload = {"meta": {"worlds": worlds, "layers": layers, "micro_batch": MICRO, "block": BLOCK,
                        "torch": torch.__version__}, "goals": goals, "cases": rows,
               "table": table(["N", "params", "ZeRO-3 MiB/rank", "x 16Ψ/N", "DDP MiB/rank", "ZeRO-3 step (s)",
                               "DDP step (s)", "local step (s)", "ZeRO-3 / DDP"],
                              [[str(r["world"]), f"{r['params'] / 1e6:.1f}M", f"{r['bytes']['zero-3'] / 2**20:.1f}",
                                f"{r['memory_ratio']:.3f}", f"{r['bytes']['ddp'] / 2**20:.1f}",
                                f"{r['step_s']['zero-3']:.3f}", f"{r['step_s']['ddp']:.3f}",
                                f"{r['step_s']['local']:.3f}",
                                f"{r['zero3_over_ddp']:.2f}"] for r in rows])}
    write_results(args.out, "scaling", payload, _plot(rows, worlds))
    return 0


def _plot(rows: list[dict], worlds: list[int]) -> Any:
    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for i, n in enumerate(worlds):
        mine = sorted((r for r in rows if r["world"] == n), key=lambda r: r["params"])
        ps = [r["params"] / 1e6 for r in mine]
        ax.plot(ps, [r["bytes"]["zero-3"] / 2**20 for r in mine], "o-", color=f"C{i}", label=f"ZeRO-3, N={n}")
        ax.plot(ps, [r["formula_zero3"] / 2**20 for r in mine], ":", color=f"C{i}")
        bx.plot(ps, [r["step_s"]["zero-3"] for r in mine], "o-", color=f"C{i}", label=f"ZeRO-3, N={n}")
        bx.plot(ps, [r["step_s"]["ddp"] for r in mine], "s--", color=f"C{i}", alpha=0.6, label=f"DDP, N={n}")
        bx.plot(ps, [r["step_s"]["local"] for r in mine], ":", color=f"C{i}", alpha=0.6)
    ddp = sorted((r for r in rows if r["world"] == worlds[0]), key=lambda r: r["params"])
    ax.plot([r["params"] / 1e6 for r in ddp], [16 * r["params"] / 2**20 for r in ddp], "k--", label="DDP 16Ψ")
    ax.set(xscale="log", yscale="log", xlabel="parameters (M)", ylabel="model states per rank (MiB)",
           title="memory per rank (dotted: 16Ψ/N)")
    bx.set(xscale="log", yscale="log", xlabel="parameters (M)", ylabel="step time (s)",
           title="step time (dotted: local compute)")
    ax.legend(fontsize=7)
    bx.legend(fontsize=7, ncol=2)
    return fig


if __name__ == "__main__":
    raise SystemExit(main())
