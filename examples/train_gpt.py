"""Train a small GPT data-parallel on several CPU ranks, through zero-comm.

    torchrun --standalone --nproc-per-node 2 examples/train_gpt.py --steps 200

Runs on CPU with Gloo, or on one GPU per rank with NCCL when CUDA is present.
Every rank builds the same model, takes its slice of each global batch, and
averages gradients with one bucketed all-reduce per step; rank 0 prints the loss
and, at the end, what the comm ledger saw. The task is synthetic (continue an
arithmetic sequence modulo the vocabulary), so it needs no download and its loss
falls within a minute on a laptop CPU.

The model and loop stay small on purpose: read it in one sitting.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import zero_comm


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 64
    block_size: int = 32
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)  # a key bias gets no gradient
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        hidden = 4 * cfg.n_embd
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, hidden), nn.GELU(), nn.Linear(hidden, cfg.n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Token + position embeddings, pre-norm blocks, and an output head tied to the token embedding."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.head.weight = self.tok.weight  # tied
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def global_batch(step: int, batch_size: int, cfg: GPTConfig, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences start + i * stride (mod vocab); the model learns to continue them. Same on every rank."""
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    start = torch.randint(0, cfg.vocab_size, (batch_size, 1), generator=g)
    stride = torch.randint(1, 8, (batch_size, 1), generator=g)
    seq = (start + stride * torch.arange(cfg.block_size + 1)) % cfg.vocab_size
    return seq[:, :-1], seq[:, 1:]


def train(steps: int = 200, batch_size: int = 16, lr: float = 3e-3, seed: int = 0,
          cfg: GPTConfig = GPTConfig(), log_every: int = 20) -> tuple[list[float], GPT]:
    """Train data-parallel on the current world (a world of one without a launcher).

    Returns the loss of every step (averaged over ranks) and the trained model.
    """
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
