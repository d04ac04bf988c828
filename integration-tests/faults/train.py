"""A DeepSpeed-style training script the fault tests launch with ``zero run``: a small MLP regression
trained with ``zero_all.initialize``, data a pure function of the step (so a resumed run sees the
batches an uninterrupted one did), ``save_checkpoint`` every ``--save-every`` steps, resume from
``latest``. Each rank appends one JSON line per step to ``<--out>.rank<R>``: step, loss, loss scale, whether the step
was skipped, and (``--resources``) resident memory, threads, open files and swap files."""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

import torch
from torch import nn

import zero_all as deepspeed


def args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--save-dir", default="")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--offload", choices=["none", "cpu", "nvme"], default="none")
    p.add_argument("--nvme-path", default="")
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--poison-step", type=int, default=-1, help="this step's gradients overflow on --poison-rank")
    p.add_argument("--poison-rank", type=int, default=1)
    p.add_argument("--die-step", type=int, default=-1, help="--poison-rank SIGKILLs itself in this step")
    p.add_argument("--raise-step", type=int, default=-1, help="--poison-rank raises in this step, after backward")
    p.add_argument("--resources", action="store_true")
    p.add_argument("--out", required=True)
    return p.parse_args()


def config(a: argparse.Namespace) -> dict:
    zero: dict = {"stage": a.stage}
    if a.offload != "none":
        zero["offload_optimizer"] = {"device": a.offload, "nvme_path": a.nvme_path or None}
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
           "zero_optimization": zero}
    if a.fp16:
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 4, "hysteresis": 1}
    return cfg


def resources(save_dir: str, nvme: str) -> dict:
    swap = sum(1 for d in Path(nvme).glob("zero-swap-*") for _ in d.iterdir()) if nvme else 0
    stray = [p.name for p in Path(save_dir).glob("*.partial-*")] if save_dir else []
    rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return {"rss": rss, "threads": len(os.listdir("/proc/self/task")), "fds": len(os.listdir("/proc/self/fd")),
            "swap_files": swap, "stray": stray}


def main() -> None:
    a = args()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, a.width), nn.Tanh(), nn.Linear(a.width, a.width), nn.Tanh(),
                          nn.Linear(a.width, 1))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config(a))
    rank, world = engine.global_rank, engine.world_size
    dtype = torch.half if a.fp16 else torch.float32
    start = 0
    if a.resume:
        _, client = engine.load_checkpoint(a.save_dir)
        start = client["step"] if client else 0
    out = open(f"{a.out}.rank{rank}", "a")  # noqa: SIM115 -- appended to step by step
    for step in range(start, a.steps):
        g = torch.Generator().manual_seed(1000 + step)
        x = torch.randn(world * 4, 16, generator=g)
        y = x.sum(dim=1, keepdim=True).sin()
        mine = slice(rank * 4, (rank + 1) * 4)
        loss = nn.functional.mse_loss(engine(x[mine].to(dtype)).float(), y[mine])
        poisoned = step == a.poison_step and rank == a.poison_rank  # an overflow in this rank's gradients only
        engine.backward(loss * float("inf") if poisoned else loss)
        if step == a.die_step and a.poison_rank in (rank, -1):  # -1: every rank
            os.kill(os.getpid(), signal.SIGKILL)
        if step == a.raise_step and rank == a.poison_rank:
            raise RuntimeError(f"rank {rank} found a bad batch in step {step + 1}")
        engine.step()
        total = loss.detach().clone()
        torch.distributed.all_reduce(total)
        if a.save_every and (step + 1) % a.save_every == 0:
            engine.save_checkpoint(a.save_dir, tag=f"step{step + 1}", client_state={"step": step + 1})
        record = {"step": step + 1, "loss": total.item() / world, "scale": engine.optimizer.loss_scale,
                  "applied": engine.was_step_applied(),
                  "weight": float(sum(p.detach().double().sum() for p in engine.module.parameters() if p.numel()))}
        if a.resources:
            record.update(resources(a.save_dir, a.nvme_path))
        out.write(json.dumps(record) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
