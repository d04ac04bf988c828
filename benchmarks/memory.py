"""Model-state bytes per rank against the ZeRO paper's formula, stages 1-3 in fp32 and bf16.

    python benchmarks/memory.py [--world-size 2] [--out benchmarks/results]

For each case, ``world_size`` fresh Gloo ranks build a 3.4M-parameter GPT (examples/gpt.py),
hand it to ``zero_all.initialize`` with an AdamW config, train two steps and run a third
backward, so each rank holds a micro-batch's gradients. Then the process's live CPU tensors
are walked from the garbage collector (every distinct storage once; not counters the code
keeps itself) and compared with the formula: Ψ parameters, N ranks, Adam,

    precision  stage 1           stage 2        stage 3
    bf16       2Ψ + 2Ψ + 12Ψ/N   2Ψ + 14Ψ/N     16Ψ/N
    fp32       4Ψ + 4Ψ + 8Ψ/N    4Ψ + 12Ψ/N     16Ψ/N

Each case runs twice: with ``reduce_bucket_size`` an eighth of the model, and with
DeepSpeed's default (5e8, larger than the whole model: one bucket). The goal, <= 1.10x the
formula, applies to both. Writes ``memory.json`` and ``memory.png``; one line per case.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from _common import goal, pyplot, table, write_results, zero_formula_bytes

from zero_comm.testing import live_tensor_bytes, run_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from gpt import GPT, GPTConfig

CONFIG = GPTConfig(vocab_size=4096, block_size=64, n_layer=3, n_head=4, n_embd=256)
DEFAULT_BUCKET = 500_000_000


def model_states(precision: str, stage: int, bucket: int) -> dict:
    import zero_all

    torch.manual_seed(0)
    model = GPT(CONFIG)
    psi = sum(p.numel() for p in model.parameters())
    config = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
              "zero_optimization": {"stage": stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket,
                                    "stage3_param_persistence_threshold": 1024},
              "bf16": {"enabled": precision == "bf16"}, "progress_bar": False}
    engine, *_ = zero_all.initialize(model=model, model_parameters=model.parameters(), config=config)
    g = torch.Generator().manual_seed(engine.global_rank)
    for step in range(3):
        seq = torch.randint(0, CONFIG.vocab_size, (4, CONFIG.block_size + 1), generator=g)
        engine.backward(engine(seq[:, :-1], seq[:, 1:]))
        if step < 2:
            engine.step()  # after the third backward the gradients are held, as between micro-steps
    return {"psi": psi, "bytes": live_tensor_bytes(), "world": engine.dp_world_size}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    psi = sum(p.numel() for p in GPT(CONFIG).parameters())
    buckets = {"model/8": psi // 8, "default": DEFAULT_BUCKET}
    rows = []
    for label, bucket in buckets.items():
        for precision in ("fp32", "bf16"):
            for stage in (1, 2, 3):
                got = run_ranks(model_states, args.world_size, precision, stage, bucket, timeout=600)
                worst = max(r["bytes"] for r in got)
                want = zero_formula_bytes(psi, args.world_size, stage, precision)
                rows.append({"bucket": label, "precision": precision, "stage": stage, "bytes": worst,
                             "formula": want, "ratio": worst / want})
                print(f"  stage {stage} {precision} bucket {label}: {worst / 2**20:.2f} MiB per rank, "
                      f"formula {want / 2**20:.2f} MiB, {worst / want:.3f}x", flush=True)
    goals = [goal(f"stage {r['stage']} {r['precision']} (bucket {r['bucket']}) bytes / formula", r["ratio"], 1.10)
             for r in rows]
    payload = {"meta": {"world_size": args.world_size, "params": psi, "model": str(CONFIG),
                        "torch": torch.__version__}, "goals": goals, "cases": rows,
               "table": table(["stage", "precision", "reduce_bucket_size", "MiB per rank", "formula MiB", "x formula"],
                              [[str(r["stage"]), r["precision"], r["bucket"], f"{r['bytes'] / 2**20:.2f}",
                                f"{r['formula'] / 2**20:.2f}", f"{r['ratio']:.3f}"] for r in rows])}
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"s{r['stage']} {r['precision']}\n{r['bucket']}" for r in rows]
    ax.bar(labels, [r["ratio"] for r in rows], color=["C0" if r["bucket"] == "model/8" else "C1" for r in rows])
    ax.axhline(1.10, color="red", lw=0.8, label="goal 1.10x")
    ax.axhline(1.0, color="black", lw=0.6)
    ax.set_ylabel("live bytes / ZeRO formula")
    ax.set_title(f"model states per rank, {psi / 1e6:.1f}M-param GPT, {args.world_size} ranks")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=8)
    write_results(args.out, "memory", payload, fig)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
