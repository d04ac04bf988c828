"""Data parallelism by hand: a small GPT on several ranks through zero-comm alone.

    torchrun --standalone --nproc-per-node 2 examples/data_parallel.py --steps 200

Runs on CPU with Gloo, or on one GPU per rank with NCCL when CUDA is present.
Every rank builds the same model, takes its slice of each global batch, and
averages gradients with one bucketed all-reduce per step; rank 0 prints the loss
and, at the end, what the comm ledger saw. The task is synthetic (continue an
arithmetic sequence modulo the vocabulary), so it needs no download and its loss
falls within a minute on a laptop CPU.

This is what ZeRO stage 0 does, written out: the loop stays small on purpose.
The demo (examples/train_gpt.py) trains the same GPT through zero_all instead.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from gpt import GPT, GPTConfig, global_batch

import zero_comm


def train(steps: int = 200, batch_size: int = 16, lr: float = 3e-3, seed: int = 0,
          cfg: GPTConfig | None = None, log_every: int = 20) -> tuple[list[float], GPT]:
    """Train data-parallel on the current world (a world of one without a launcher).

    Returns the loss of every step (averaged over ranks) and the trained model.
    """
    cfg = cfg or GPTConfig()
    comm = zero_comm.init_distributed()
    if batch_size % comm.world_size:
        raise ValueError(f"batch size {batch_size} must divide evenly over {comm.world_size} ranks")
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if comm.backend == "nccl" else "cpu")
    torch.manual_seed(seed)
    model = GPT(cfg).to(device)
    params = list(model.parameters())
    zero_comm.broadcast_coalesced(comm, [p.data for p in params], src=0)  # every rank starts equal
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    per_rank = batch_size // comm.world_size
    mine = slice(comm.rank * per_rank, (comm.rank + 1) * per_rank)
    losses, started = [], time.perf_counter()
    for step in range(steps):
        x, y = global_batch(step, batch_size, cfg, seed)
        loss = model(x[mine].to(device), y[mine].to(device))
        loss.backward()
        zero_comm.all_reduce_coalesced(comm, [p.grad for p in params], "avg")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mean_loss = comm.all_reduce(loss.detach().clone(), "avg").item()
        losses.append(mean_loss)
        if comm.rank == 0 and log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:4d}  loss {mean_loss:.4f}  ({time.perf_counter() - started:.1f}s)", flush=True)
    return losses, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    comm = zero_comm.init_distributed()
    n_params = sum(p.numel() for p in GPT(GPTConfig()).parameters())
    if comm.rank == 0:
        where = "GPU" if comm.backend == "nccl" else "CPU"
        print(f"GPT with {n_params / 1e3:.0f}k parameters, data-parallel on {comm.world_size} {where} ranks "
              f"({comm.backend}), global batch {args.batch_size}", flush=True)
    losses, _ = train(args.steps, args.batch_size, args.lr)
    if comm.rank == 0:
        print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} (uniform guess: {math.log(GPTConfig().vocab_size):.3f})")
        print(comm.ledger.summary())
        if not losses[-1] < 0.5 * losses[0]:
            raise SystemExit("the loss did not halve: training is broken")


if __name__ == "__main__":
    main()
