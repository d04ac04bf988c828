"""Pipeline bubble, 1F1B against GPipe, and zero-pipe against torch.distributed.pipelining, in one run.

    python benchmarks/pipe.py [--rounds 3] [--batches 3] [--out benchmarks/results]

On two Gloo ranks (one thread each), a stack of identical MLP layers is cut into two
balanced stages and trained with SGD. For each way (a schedule at a number of
micro-batches ``m``) the ranks take turns, ``batches`` timed batches per way per
round, so drift on a shared machine hits every way alike.

- Bubble. The interpreter times every forward and backward it runs
  (:class:`zero_pipe.BatchTiming`); a batch's measured bubble is the idle share of
  both ranks' time over the pipelined part of the batch (up to each rank's last
  backward; the optimizer step and loss broadcast after it are reported apart as
  ``tail_s``), ``1 - (compute_0 + compute_1) / (2 * slower rank's pipelined time)``,
  compared with the theory ``(p - 1) / (m + p - 1)`` (interleaved:
  ``(p - 1) / (v * m + p - 1)``; ZB-H1 with forward, input gradient and weight gradient
  of equal cost: ``(p - 1) / (3 * m + p - 1)``). Heavy matmuls on one thread per rank make compute
  dominate the point-to-point time, as on real hardware.
- Activation memory. Every tensor autograd saves for backward passes through a
  ``saved_tensors_hooks`` pair that counts its bytes while it is alive (parameters
  excluded); the peak per rank is the activation memory the schedule holds.
- torch.distributed.pipelining. The same stages through ``PipelineStage`` with
  ``ScheduleGPipe`` and ``Schedule1F1B``, on the same model and a small model
  where per-message overhead dominates: per-batch time against ours.

Writes ``pipe.json`` and ``pipe.png``. Target: GPipe's and 1F1B's measured bubble within 5
points of theory (recorded as goals); interleaved is reported against its own formula.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from _common import goal
from torch import nn

import zero_comm
from zero_comm.testing import run_ranks
from zero_pipe import LayerSpec, PipelineEngine, PipelineModule, theoretical_bubble

STAGES = 2
SIZES = {"heavy": (1024, 8, 512), "light": (128, 8, 16)}  # width, layers, rows per micro-batch
OURS = [("gpipe", 4), ("1f1b", 4), ("gpipe", 8), ("1f1b", 8), ("interleaved", 8), ("zb-h1", 8)]
TORCH = [("torch-gpipe", 8), ("torch-1f1b", 8)]


class Layer(nn.Sequential):
    def __init__(self, width: int):
        super().__init__(nn.Linear(width, width), nn.GELU())


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out - target).pow(2).mean()


class SavedBytes:
    """Counts the bytes of tensors autograd keeps for backward, while they are kept; parameters excluded."""

    def __init__(self, params: list[torch.Tensor]):
        self.skip = {p.untyped_storage().data_ptr() for p in params}
        self.live = self.peak = 0

    def pack(self, t: torch.Tensor) -> object:
        if t.untyped_storage().data_ptr() in self.skip:
            return t
        box = _Box(t)
        size = t.numel() * t.element_size()
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(box, self._release, size)
        return box

    def _release(self, size: int) -> None:
        self.live -= size

    @staticmethod
    def unpack(x: object) -> torch.Tensor:
        return x.tensor if isinstance(x, _Box) else x  # type: ignore[return-value]


class _Box:
    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def _batch(size: str, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    width, _, rows = SIZES[size]
    g = torch.Generator().manual_seed(0)
    return torch.randn(m * rows, width, generator=g), torch.randn(m * rows, width, generator=g)


def _ours(comm: zero_comm.Communicator, size: str, schedule: str, m: int) -> tuple[Callable[[], float], list]:
    width, n_layers, _ = SIZES[size]
    chunks = 2 if schedule == "interleaved" else 1
    module = PipelineModule([LayerSpec(Layer, width) for _ in range(n_layers)], STAGES, stage_id=comm.rank,
                            loss_fn=mse, partition_method="uniform", chunks=chunks, seed=0)
    engine = PipelineEngine(module, comm, micro_batches=m, schedule=schedule,
                            optimizer=torch.optim.SGD(module.parameters(), lr=1e-3))
    batch = _batch(size, m)

    def step() -> tuple[float, float]:
        engine.train_batch(batch=batch)
        return engine.timing.pipeline, engine.timing.compute

    return step, list(module.parameters())


def _torch(comm: zero_comm.Communicator, size: str, schedule: str, m: int) -> tuple[Callable[[], float], list]:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    width, n_layers, _ = SIZES[size]
    per = n_layers // STAGES
    layers = []
    for i in range(comm.rank * per, (comm.rank + 1) * per):
        torch.manual_seed(i)
        layers.append(Layer(width))
    stage_module = nn.Sequential(*layers)
    stage = PipelineStage(stage_module, comm.rank, STAGES, torch.device("cpu"))
    kind = ScheduleGPipe if schedule == "torch-gpipe" else Schedule1F1B
    sched = kind(stage, m, loss_fn=mse)
    opt = torch.optim.SGD(stage_module.parameters(), lr=1e-3)
    x, y = _batch(size, m)

    def step() -> tuple[float, float]:
        if comm.rank == 0:
            sched.step(x)
        else:
            sched.step(target=y)
        opt.step()
        opt.zero_grad()
        return float("nan"), float("nan")

    return step, list(stage_module.parameters())


def measure(rounds: int, batches: int) -> dict:
    comm = zero_comm.init_distributed()
    ways = [(s, w, m) for s in SIZES for w, m in OURS + TORCH if s == "heavy" or w in ("1f1b", "torch-1f1b")]
    runners = {}
    for size, way, m in ways:
        build = _torch if way.startswith("torch") else _ours
        step, params = build(comm, size, way, m)
        counter = SavedBytes(params)
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
            step()  # warm-up, and the activation peak of one whole batch
        runners[(size, way, m)] = (step, counter.peak)
    samples: dict = {k: [] for k in runners}
    for _ in range(rounds):
        for key, (step, _) in runners.items():
            for _ in range(batches):
                comm.barrier()
                start = time.perf_counter()
                pipeline, compute = step()
                samples[key].append((time.perf_counter() - start, pipeline, compute))
    return {f"{s}|{w}|{m}": {"samples": v, "peak_saved_bytes": runners[(s, w, m)][1]}
            for (s, w, m), v in samples.items()}


def summarise(per_rank: list[dict]) -> dict:
    out = {}
    for key in per_rank[0]:
        size, way, m = key.split("|")
        walls = [max(r[key]["samples"][i][0] for r in per_rank) for i in range(len(per_rank[0][key]["samples"]))]
        entry = {"size": size, "schedule": way, "micro_batches": int(m), "batch_s": statistics.median(walls),
                 "peak_saved_mib": [r[key]["peak_saved_bytes"] / 2**20 for r in per_rank]}
        if not way.startswith("torch"):
            samples = [[r[key]["samples"][i] for r in per_rank] for i in range(len(walls))]
            bubbles = [1 - sum(s[2] for s in ranks) / (STAGES * max(s[1] for s in ranks)) for ranks in samples]
            entry["tail_s"] = statistics.median(w - max(s[1] for s in ranks) for w, ranks in zip(walls, samples))
            entry["bubble_measured"] = statistics.median(bubbles)
            entry["bubble_theory"] = (theoretical_bubble(STAGES, int(m), 2 if way == "interleaved" else 1)
                                      if way != "zb-h1" else (STAGES - 1) / (3 * int(m) + STAGES - 1))
        out[key] = entry
    return out


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results.values() if "bubble_measured" in r and r["size"] == "heavy"]
    labels = [f"{r['schedule']}\nm={r['micro_batches']}" for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar([x - 0.2 for x in xs], [r["bubble_theory"] for r in rows], 0.4, label="theory")
    ax.bar([x + 0.2 for x in xs], [r["bubble_measured"] for r in rows], 0.4, label="measured")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("bubble fraction")
    ax.set_title(f"pipeline bubble, {STAGES} stages, compute-bound model (Gloo, CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    per_rank = run_ranks(measure, STAGES, args.rounds, args.batches, timeout=1800, collective_timeout=300)
    results = summarise(per_rank)
    heavy = {(r["schedule"], r["micro_batches"]): r for r in results.values() if r["size"] == "heavy"}
    ratios = {
        "1f1b_over_gpipe_time_m8": heavy[("1f1b", 8)]["batch_s"] / heavy[("gpipe", 8)]["batch_s"],
        "1f1b_over_gpipe_peak_saved_m8": [a / b for a, b in zip(heavy[("1f1b", 8)]["peak_saved_mib"],
                                                                heavy[("gpipe", 8)]["peak_saved_mib"])],
        "ours_over_torch_time": {
            f"{size}|{w}": results[f"{size}|{w}|8"]["batch_s"] / results[f"{size}|torch-{w}|8"]["batch_s"]
            for size in SIZES for w in ("gpipe", "1f1b") if f"{size}|{w}|8" in results},
    }
    # the target is for the formula the issue names, GPipe's and 1F1B's; interleaved is reported against its own
    within = all(abs(r["bubble_measured"] - r["bubble_theory"]) <= 0.05 for r in results.values()
                 if "bubble_measured" in r and r["size"] == "heavy" and r["schedule"] in ("gpipe", "1f1b"))
    report = {"stages": STAGES, "sizes": SIZES, "torch": torch.__version__, "threads_per_rank": 1,
              "results": results, "ratios": ratios, "bubble_within_5_points": within,
              "goals": [goal(f"{r['schedule']} m={r['micro_batches']} |measured - theory| bubble",
                             abs(r["bubble_measured"] - r["bubble_theory"]), 0.05) for r in results.values()
                        if "bubble_measured" in r and r["size"] == "heavy" and r["schedule"] in ("gpipe", "1f1b")]}
    for r in results.values():
        bubble = (f"  bubble {r['bubble_measured']:.3f} (theory {r['bubble_theory']:.3f})"
                  if "bubble_measured" in r else "")
        print(f"{r['size']:5} {r['schedule']:12} m={r['micro_batches']:2}  {r['batch_s'] * 1e3:8.1f} ms/batch  "
              f"saved MiB {[round(v, 1) for v in r['peak_saved_mib']]}{bubble}")
    print(json.dumps(ratios, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pipe.json").write_text(json.dumps(report, indent=1) + "\n")
    _plot(results, args.out / "pipe.png")
    return 0  # a missed target is in the JSON's goals (and on the page), not a failed run


if __name__ == "__main__":
    sys.exit(main())
