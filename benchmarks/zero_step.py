"""Training step time of ZeRO stages 0-3 against torch DDP and FSDP2, in one run.

    python benchmarks/zero_step.py [--world-size 2] [--rounds 4] [--steps 3] [--out benchmarks/results]

On ``world_size`` Gloo ranks, a ~20M-parameter GPT is trained (fp32, AdamW) six
ways: torch ``DistributedDataParallel`` with ``torch.optim.AdamW`` -- the baseline --,
zero's ``ZeroOptimizer`` at stages 0, 1 and 2, zero's ``ZeroStage3``, and PyTorch
FSDP2 (``fully_shard`` on every block and on the model, ``torch.optim.AdamW``), the
peer stage 3 is measured against. Each way has its own copy of the
model; the ways take turns, ``steps`` timed steps each, for ``rounds`` rounds, so
drift on a shared machine hits all of them alike. A step is forward, backward and
optimizer step of one micro-batch per rank; the slowest rank's time counts. Writes
``zero_step.json`` and ``zero_step.png``. Targets: stages 1 and 2 within 1.05x DDP;
stage 3 within 1.3x DDP and no slower than FSDP2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

import zero_comm
from zero_comm.testing import run_ranks
from zero_optim import AdamW, ZeroConfig, ZeroOptimizer, ZeroStage3

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from gpt import GPT, GPTConfig

CONFIG = GPTConfig(vocab_size=8192, block_size=64, n_layer=10, n_head=6, n_embd=384)
WAYS = ("ddp", "zero-0", "zero-1", "zero-2", "zero-3", "zero-3b", "fsdp2")


def _batch(step: int, rank: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step * 1000 + rank)
    seq = torch.randint(0, CONFIG.vocab_size, (micro, CONFIG.block_size + 1), generator=g)
    return seq[:, :-1], seq[:, 1:]


def measure(rounds: int, steps: int, micro: int) -> dict:
    comm = zero_comm.init_distributed()
    trainers = {}
    for way in WAYS:
        torch.manual_seed(0)
        model = GPT(CONFIG)
        if way == "ddp":
            ddp = DistributedDataParallel(model)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

            def step(x, y, ddp=ddp, opt=opt):
                ddp(x, y).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        elif way == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (comm.world_size,))
            for block in model.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            fopt = torch.optim.AdamW(model.parameters(), lr=1e-4)

            def step(x, y, model=model, opt=fopt):
                model(x, y).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        elif way.startswith("zero-3"):
            units = {"zero-3": 0, "zero-3b": 2_000_000}[way]
            zopt3 = ZeroStage3(model, AdamW(lr=1e-4), comm=comm, config=ZeroConfig(stage=3, unit_numel=units))

            def step(x, y, model=model, zopt=zopt3):
                zopt.backward(model(x, y))
                zopt.step()
        else:
            zopt = ZeroOptimizer(model.parameters(), AdamW(lr=1e-4), comm=comm,
                                 config=ZeroConfig(stage=int(way[-1]), bucket_numel=1 << 22))

            def step(x, y, model=model, zopt=zopt):
                zopt.backward(model(x, y))
                zopt.step()
        trainers[way] = step
    params = sum(p.numel() for p in GPT(CONFIG).parameters())
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    for step in trainers.values():  # warm up every way once
        step(*_batch(0, comm.rank, micro))
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
    return {"params": params, "times": times}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    print(f"GPT {CONFIG}, {args.world_size} Gloo ranks, fp32 AdamW, micro-batch {args.micro_batch} per rank",
          flush=True)
    result = run_ranks(measure, args.world_size, args.rounds, args.steps, args.micro_batch, timeout=3600)[0]
    medians = {way: statistics.median(t) for way, t in result["times"].items()}
    base = medians["ddp"]
    print(f"{result['params'] / 1e6:.1f}M parameters; median step time over {args.rounds * args.steps} steps")
    print(f"{'way':<8}{'step s':>9}{'x DDP':>8}")
    for way in WAYS:
        print(f"{way:<8}{medians[way]:>9.3f}{medians[way] / base:>8.2f}")
    within = all(medians[w] / base <= 1.05 for w in ("zero-1", "zero-2"))
    print(f"stages 1 and 2 {'within' if within else 'NOT within'} 1.05x DDP")
    stage3 = medians["zero-3"] / base <= 1.3 and medians["zero-3"] <= medians["fsdp2"]
    print(f"stage 3 {'within' if stage3 else 'NOT within'} 1.3x DDP and no slower than FSDP2")
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": {"world_size": args.world_size, "backend": "gloo", "precision": "fp32",
                        "params": result["params"], "torch": torch.__version__, "micro_batch": args.micro_batch,
                        "target": "stages 1 and 2 <= 1.05x DDP; stage 3 <= 1.3x DDP and <= FSDP2",
                        "within_target": within, "stage3_within_target": stage3},
               "median_step_s": medians, "ratio_to_ddp": {w: medians[w] / base for w in WAYS},
               "times": result["times"]}
    (args.out / "zero_step.json").write_text(json.dumps(payload, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(WAYS, [medians[w] / base for w in WAYS], color=["grey", "C0", "C1", "C2", "C3", "C5", "C4"])
    ax.axhline(1.05, color="red", lw=0.8, label="1.05x DDP")
    ax.axhline(1.3, color="red", lw=0.8, ls="--", label="1.3x DDP")
    ax.set_ylabel("step time / DDP step time")
    ax.set_title(f"{result['params'] / 1e6:.0f}M-param GPT, {args.world_size} Gloo ranks, fp32 AdamW")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "zero_step.png", dpi=110)
    print(f"wrote {args.out / 'zero_step.json'} and {args.out / 'zero_step.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
