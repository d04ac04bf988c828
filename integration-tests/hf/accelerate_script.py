"""A plain Hugging Face Accelerate training loop, as a user writes it: a tiny GPT-2 built from a config (fixed
seed, no downloads), a torch AdamW and a linear warmup schedule, random tokens. ``--deepspeed CONFIG`` hands
Accelerate a DeepSpeed plugin with that config exactly as with DeepSpeed installed; nothing here mentions zero.

    torchrun --nproc_per_node 2 accelerate_script.py --out DIR [--deepspeed CONFIG] [--steps N] [--accumulation K]
             [--save-state DIR --save-at K] [--load-state DIR --resume-at K]

Writes ``DIR/losses.json`` (rank 0: each optimizer step's loss averaged over the ranks, and the learning rate
the optimizer stepped with). ``--save-state`` saves the whole training state after step K (twice, to the same
folder, as a script saving every few steps would); ``--load-state`` resumes from it.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from accelerate import Accelerator, DeepSpeedPlugin
from transformers import GPT2Config, GPT2LMHeadModel, get_linear_schedule_with_warmup

VOCAB, SEQ = 128, 16


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--deepspeed", default=None)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--accumulation", type=int, default=2)
    p.add_argument("--save-state", default=None)
    p.add_argument("--save-at", type=int, default=6)
    p.add_argument("--load-state", default=None)
    p.add_argument("--resume-at", type=int, default=6)
    args = p.parse_args()

    plugin = DeepSpeedPlugin(hf_ds_config=args.deepspeed, gradient_accumulation_steps=args.accumulation) \
        if args.deepspeed else None
    accelerator = Accelerator(deepspeed_plugin=plugin, gradient_accumulation_steps=args.accumulation)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=SEQ,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=3, num_training_steps=4 * args.steps)
    ids = torch.randint(0, VOCAB, (512, SEQ), generator=torch.Generator().manual_seed(1234))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=4, shuffle=False)
    model, optimizer, data, schedule = accelerator.prepare(model, optimizer, data, schedule)

    losses: list[float] = []
    lrs: list[float] = []
    step_loss = 0.0
    done = 0
    if args.load_state:
        accelerator.load_state(args.load_state)
        done = args.resume_at
        data = accelerator.skip_first_batches(data, num_batches=done * args.accumulation)
    for (batch,) in data:
        with accelerator.accumulate(model):
            loss = model(input_ids=batch, labels=batch).loss
            accelerator.backward(loss)
            step_loss += accelerator.reduce(loss.detach(), "mean").item() / args.accumulation
            if accelerator.sync_gradients:
                lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            losses.append(step_loss)
            step_loss = 0.0
            done += 1
            if args.save_state and done == args.save_at:
                accelerator.save_state(args.save_state)
                accelerator.save_state(args.save_state)  # again, over the first: a checkpoint is replaced whole
            if done == args.steps:
                break
    if accelerator.is_main_process:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "losses.json"), "w") as f:
            json.dump({"losses": losses, "lrs": lrs, "processes": accelerator.num_processes,
                       "distributed_type": str(accelerator.distributed_type), "engine": type(model).__name__}, f)
    accelerator.end_training()


if __name__ == "__main__":
    main()
