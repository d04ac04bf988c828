"""A DeepSpeed training script as users write them; only the import is zero's.

    zero run --nproc 2 deepspeed_script.py --deepspeed_config ds.json --steps 6 --save-at 3 --out DIR

Trains the small GPT of examples/gpt.py on the synthetic sequence task. At
``--save-at`` it saves a checkpoint, throws the engine away, builds a fresh model
and engine, loads the checkpoint and goes on: the losses written to
``DIR/losses.json`` (rank 0) therefore cover one interrupted run, and equal an
uninterrupted one only if save and load are exact.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import zero_all as deepspeed

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from gpt import GPT, GPTConfig, global_batch

CFG = GPTConfig()


def build(args: argparse.Namespace):
    torch.manual_seed(0)
    model = GPT(CFG)
    engine, _, _, _ = deepspeed.initialize(args=args, model=model, model_parameters=model.parameters())
    return engine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--save-at", type=int, default=3)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=-1)  # what the deepspeed launcher passes
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args()
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(args.out)

    engine = build(args)
    micro, accum = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    mine = slice(rank * micro, (rank + 1) * micro)
    losses, lrs = [], []
    for step in range(args.steps):
        if step == args.save_at:
            engine.save_checkpoint(out / "ckpt", client_state={"step": step})
            del engine
            engine = build(args)
            _, client = engine.load_checkpoint(out / "ckpt")
            assert client["step"] == step, client
        lrs.append(engine.get_lr()[0])
        total = torch.zeros((), device=engine.device)
        for m in range(accum):
            x, y = global_batch(step * accum + m, micro * world, CFG)
            loss = engine(x[mine].to(engine.device), y[mine].to(engine.device))
            engine.backward(loss)
            engine.step()
            total += loss.detach().float() / accum
        dist.all_reduce(total)
        losses.append(total.item() / world)
    if rank == 0:
        (out / "losses.json").write_text(json.dumps({"losses": losses, "lrs": lrs,
                                                     "global_steps": engine.global_steps}))


if __name__ == "__main__":
    main()
