"""The demo: a small GPT learns to write Python, trained the DeepSpeed way through zero.

    zero run --nproc 2 examples/train_gpt.py --deepspeed_config examples/ds_config.json

This is an ordinary DeepSpeed training script -- argparse with
``add_config_arguments``, ``initialize`` with a ds_config file, the
forward/backward/step loop, ``save_checkpoint`` -- except for its first import:
``import zero_all as deepspeed``. The config (examples/ds_config.json) asks for
ZeRO stage 3 (each rank holds half the parameters, gathered per module on use)
with the optimizer offloaded to CPU memory, a warm-up/decay LR schedule and
gradient clipping.

The corpus is the Python standard library's own source, read character by
character: every machine that runs this has it, so nothing is downloaded. At the
end rank 0 writes, under ``--out``: the checkpoint (``checkpoints/``), the loss
curve (``loss.png`` and ``losses.csv``) and a sample of generated text
(``sample.txt``, also printed). ``--load`` resumes from a checkpoint directory.
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from gpt import GPT, CharCorpus, GPTConfig, generate

import zero_all as deepspeed


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500, help="optimizer steps (default 500)")
    parser.add_argument("--out", default="demo-output", help="where the checkpoint, plot and sample go")
    parser.add_argument("--load", default=None, help="resume from this checkpoint directory")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--sample-chars", type=int, default=300)
    parser.add_argument("--expect", type=float, default=0.6,
                        help="fail unless the end loss is below this fraction of the start (0: no check)")
    parser = deepspeed.add_config_arguments(parser)
    return parser.parse_args()


def plot(losses: list[float], path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/char)")
    ax.set_title("GPT on the Python standard library, ZeRO-3 + CPU offload")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> None:
    args = parse_args()
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    corpus = CharCorpus()
    cfg = GPTConfig(vocab_size=corpus.vocab_size, block_size=args.context, n_layer=args.layers,
                    n_head=4, n_embd=args.width)
    torch.manual_seed(0)
    model = GPT(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    engine, _, _, _ = deepspeed.initialize(args=args, model=model, model_parameters=model.parameters())
    micro, accum = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    if rank == 0:
        print(f"GPT, {n_params / 1e6:.2f}M parameters; corpus: {len(corpus.data) / 1e6:.1f}M characters of "
              f"{corpus.files} standard-library files; {world} ranks x micro-batch {micro} x {accum} "
              f"accumulation; uniform guess {math.log(corpus.vocab_size):.2f} nats", flush=True)
    start = 0
    out = Path(args.out)
    if args.load:
        path, client = engine.load_checkpoint(args.load)
        start = int(client["step"])
        if rank == 0:
            print(f"resumed from {path} at step {start}", flush=True)

    losses: list[float] = []
    mine = slice(rank * micro, (rank + 1) * micro)
    began = time.perf_counter()
    for step in range(start, start + args.steps):
        total = torch.zeros((), device=engine.device)
        for m in range(accum):
            x, y = corpus.batch(step * accum + m, micro * world, cfg.block_size)
            loss = engine(x[mine].to(engine.device), y[mine].to(engine.device))
            engine.backward(loss)
            engine.step()
            total += loss.detach() / accum
        dist.all_reduce(total)
        losses.append(total.item() / world)
        if rank == 0 and (step % 50 == 0 or step == start + args.steps - 1):
            print(f"step {step:4d}  loss {losses[-1]:.3f}  lr {engine.get_lr()[0]:.2e}  "
                  f"({time.perf_counter() - began:.0f}s)", flush=True)

    tag = f"global_step{engine.global_steps}"  # save_checkpoint returns True, as DeepSpeed's does
    engine.save_checkpoint(out / "checkpoints", tag=tag, client_state={"step": start + args.steps})
    engine.eval()
    prompt = corpus.encode("def ").to(engine.device)
    text = corpus.decode(generate(engine.module, prompt, args.sample_chars, cfg.block_size))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "losses.csv", "w", newline="") as f:
            csv.writer(f).writerows([("step", "loss"), *((start + i, v) for i, v in enumerate(losses))])
        plotted = plot(losses, out / "loss.png")
        (out / "sample.txt").write_text(text + "\n")
        end = sum(losses[-10:]) / len(losses[-10:])  # one batch is noisy: the mean of the last ten steps
        print(f"\nloss {losses[0]:.3f} -> {end:.3f} (mean of the last 10 steps; {end / losses[0]:.0%} of the "
              f"start) in {time.perf_counter() - began:.0f}s")
        print(f"checkpoint: {out / 'checkpoints' / tag}")
        print(f"loss curve: {out / 'loss.png' if plotted else '(matplotlib missing: no plot)'}, {out / 'losses.csv'}")
        print(f"sample ({out / 'sample.txt'}):\n" + "-" * 60 + f"\n{text}\n" + "-" * 60, flush=True)
        if args.expect and not args.load and not end < args.expect * losses[0]:
            raise SystemExit(f"the loss did not fall below {args.expect:.0%} of its start: training is broken")


if __name__ == "__main__":
    main()
