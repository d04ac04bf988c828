"""ZeRO++ against plain ZeRO-3 in the same run: bytes moved, step time and loss, on the demo GPT.

    python benchmarks/zeropp.py [--world-size 4] [--steps 50] [--hpz 2] [--out benchmarks/results]

On ``world_size`` Gloo ranks, trains examples/gpt.py (a wider config than the tests') through
``deepspeed.initialize`` at stage 3 with each of: no ZeRO++ (the baseline), qwZ + qgZ
(``zero_quantized_weights`` + ``zero_quantized_gradients``), hpZ (``zero_hpz_partition_size``), and all
three. Each case runs the same steps from the same seed; the runs take turns (baseline first, then the
cases, twice over) so drift on a shared machine hits all alike. Reports per case: the bytes its gathers and
its gradient reduction put on the wire per step, from zero-comm's ledger (by group: ``world`` and the hpZ
group), as a ratio to the baseline's; the median step time as a ratio to the baseline's; the worst relative
loss difference over the run. Writes ``zeropp.json``.

On one CPU machine every "link" is the same memory, so hpZ's win (gathers inside a node instead of
across nodes) cannot show in time here, and quantising costs compute that a network would repay:
the byte ratios are the signal; the time ratios say what the extra work costs on CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from _common import table

from zero_comm.testing import run_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

CASES = {
    "baseline": {},
    "qwZ+qgZ": {"zero_quantized_weights": True, "zero_quantized_gradients": True},
    "hpZ": {"zero_hpz_partition_size": "HPZ"},
    "qwZ+qgZ+hpZ": {"zero_quantized_weights": True, "zero_quantized_gradients": True,
                    "zero_hpz_partition_size": "HPZ"},
}
BATCH = 16


def run_case(zeropp: dict, steps: int) -> dict:
    import gpt

    import zero_all as deepspeed

    torch.manual_seed(0)
    cfg = gpt.GPTConfig(n_layer=4, n_embd=128, block_size=64)
    config = {"train_batch_size": BATCH, "gradient_clipping": 1.0,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, **zeropp}}
    engine, *_ = deepspeed.initialize(model=gpt.GPT(cfg), config=config)
    comm = engine.comm
    per_rank = BATCH // comm.world_size
    losses, times = [], []
    with comm.ledger.measure() as booked:
        for step in range(steps):
            x, y = gpt.global_batch(step, BATCH, cfg)
            mine = slice(comm.rank * per_rank, (comm.rank + 1) * per_rank)
            comm.barrier()
            start = time.perf_counter()
            loss = engine(x[mine], y[mine])
            engine.backward(loss)
            engine.step()
            took = torch.tensor([time.perf_counter() - start])
            times.append(comm.all_reduce(took, "max").item())
            losses.append(comm.all_reduce(loss.detach(), "avg").item())
    moved = {f"{kind}@{group}": e.payload_bytes / steps for (kind, group), e in booked.snapshot().items()}
    return {"losses": losses, "step_s": statistics.median(times[2:]), "bytes_per_step": moved}


def _gathers(moved: dict) -> float:
    return sum(b for k, b in moved.items() if k.startswith("all_gather@"))


def _reduces(moved: dict) -> float:
    return sum(b for k, b in moved.items() if k.startswith(("reduce_scatter@", "all_to_all@")))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--hpz", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    runs: dict[str, list[dict]] = {name: [] for name in CASES}
    for r in range(args.rounds):
        for name, keys in CASES.items():
            zeropp = {k: (args.hpz if v == "HPZ" else v) for k, v in keys.items()}
            print(f"round {r + 1}/{args.rounds}: {name} ({args.world_size} ranks, {args.steps} steps)", flush=True)
            runs[name].append(run_ranks(run_case, args.world_size, zeropp, args.steps, timeout=1800)[0])
    base = runs["baseline"]
    base_time = statistics.median(run["step_s"] for run in base)
    results = {}
    for name, got in runs.items():
        first = got[0]
        results[name] = {
            "gather_bytes_ratio": _gathers(first["bytes_per_step"]) / _gathers(base[0]["bytes_per_step"]),
            "reduce_bytes_ratio": _reduces(first["bytes_per_step"]) / _reduces(base[0]["bytes_per_step"]),
            "world_gather_bytes_ratio": first["bytes_per_step"].get("all_gather@world", 0.0)
            / base[0]["bytes_per_step"]["all_gather@world"],
            "step_time_ratio": statistics.median(run["step_s"] for run in got) / base_time,
            "worst_loss_rel_diff": max(abs(a - b) / abs(b) for a, b in zip(first["losses"], base[0]["losses"],
                                                                          strict=True)),
            "bytes_per_step": first["bytes_per_step"],
        }
    print("\n| case | gather bytes | of which across the world | reduce bytes | step time | worst loss diff |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['gather_bytes_ratio']:.2f}x | {r['world_gather_bytes_ratio']:.2f}x | "
              f"{r['reduce_bytes_ratio']:.2f}x | {r['step_time_ratio']:.2f}x | {r['worst_loss_rel_diff']:.1e} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "zeropp.json").write_text(json.dumps({
        "machine": platform.platform(), "cpus": torch.get_num_threads(), "world_size": args.world_size,
        "steps": args.steps, "hpz": args.hpz, "date": time.strftime("%Y-%m-%d"), "results": results,
        "table": table(["case", "gather bytes", "of which across the world", "reduce bytes", "step time",
                        "worst loss diff"],
                       [[name, f"{r['gather_bytes_ratio']:.2f}x", f"{r['world_gather_bytes_ratio']:.2f}x",
                         f"{r['reduce_bytes_ratio']:.2f}x", f"{r['step_time_ratio']:.2f}x",
                         f"{r['worst_loss_rel_diff']:.1e}"] for name, r in results.items()])}, indent=1))


if __name__ == "__main__":
    main()
