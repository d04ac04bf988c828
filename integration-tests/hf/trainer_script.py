"""A plain Hugging Face Trainer script, as a user writes it: a tiny GPT-2 built from a config (fixed seed,
no downloads) trained on random tokens. ``--deepspeed ds_config.json`` turns DeepSpeed on exactly as with
DeepSpeed installed; nothing here mentions zero (``zero hf enable`` makes ``import deepspeed`` zero's).

    torchrun --nproc_per_node 2 trainer_script.py --out DIR [--deepspeed CONFIG] [--steps N]
             [--save-steps K] [--resume CHECKPOINT] [--export DIR] [--pretrained DIR] [--evaluate]

Writes ``DIR/losses.json`` (rank 0: the per-step training losses the Trainer logged) and ``DIR/probe.pt``
(the trained model's logits on two fixed sequences); with ``--evaluate`` only ``DIR/eval.json``.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

VOCAB, SEQ = 128, 16


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(1234))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class LossLog(TrainerCallback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses[state.global_step] = logs["loss"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--deepspeed", default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--save-steps", type=int, default=0)
    p.add_argument("--resume", default=None)
    p.add_argument("--export", default=None)
    p.add_argument("--pretrained", default=None)
    p.add_argument("--accumulation", type=int, default=1)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--evaluate", action="store_true", help="only Trainer.evaluate and predict, no training")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)

    training = TrainingArguments(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=4, learning_rate=1e-3,
        gradient_accumulation_steps=args.accumulation, logging_steps=1, report_to=[], seed=0, data_seed=0,
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
        deepspeed=args.deepspeed, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
        warmup_steps=2, weight_decay=args.weight_decay)
    # after TrainingArguments, as HF's docs say: with a ZeRO-3 config from_pretrained then builds the model
    # partitioned (deepspeed.zero.Init) and loads each weight into its shards
    torch.manual_seed(0)
    if args.pretrained:
        model = GPT2LMHeadModel.from_pretrained(args.pretrained)
    else:
        config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=SEQ,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = GPT2LMHeadModel(config)
    log = LossLog()
    trainer = Trainer(model=model, args=training, train_dataset=RandomTokens(256), eval_dataset=RandomTokens(32),
                      callbacks=[log])
    if args.evaluate:
        metrics = trainer.evaluate()
        predictions = trainer.predict(RandomTokens(8)).predictions
        if int(os.environ.get("RANK", "0")) == 0:
            with open(os.path.join(args.out, "eval.json"), "w") as f:
                json.dump({"eval_loss": metrics["eval_loss"], "predictions_shape": list(predictions[0].shape)}, f)
        return
    trainer.train(resume_from_checkpoint=args.resume)
    if args.export:
        trainer.save_model(args.export)
    probe = RandomTokens(4).ids[:2]
    trainer.model_wrapped.eval()
    with torch.no_grad():  # every rank runs it: at ZeRO-3 the forward gathers each layer's weights
        logits = trainer.model_wrapped(input_ids=probe).logits
    if int(os.environ.get("RANK", "0")) == 0:
        with open(os.path.join(args.out, "losses.json"), "w") as f:
            json.dump({str(k): v for k, v in sorted(log.losses.items())}, f)
        torch.save({"input_ids": probe, "logits": logits}, os.path.join(args.out, "probe.pt"))


if __name__ == "__main__":
    main()
