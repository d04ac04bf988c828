"""Small models and data for zero-optim's tests: an MLP, a GPT with tied embeddings (optionally
with activation checkpointing), an MLP that runs one layer twice per forward, and a stack whose
layer order changes from step to step."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from zero_optim import gathered


class MLP(nn.Module):
    def __init__(self, d_in: int = 32, hidden: int = 64, classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.net(x.to(self.net[0].weight.dtype)).float(), y)


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)  # a key bias gets no gradient: leave it out
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(y)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """About 0.85M parameters; the output head shares the token embedding."""

    def __init__(self, vocab: int = 256, block: int = 32, layers: int = 4, d: int = 128, heads: int = 4,
                 recompute: bool = False):
        super().__init__()
        self.recompute = recompute
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                with gathered(m.weight, modifier_rank=0):  # built under zero_optim.partitioned, it is sharded
                    nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.recompute else block(x)
        logits = self.head(self.ln_f(x)).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class Twice(nn.Module):
    """An MLP whose middle layer runs twice per forward."""

    def __init__(self, d_in: int = 32, hidden: int = 64, classes: int = 10):
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(d_in, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.inp(x.to(self.inp.weight.dtype)))
        h = F.gelu(self.mid(F.gelu(self.mid(h))))
        return F.cross_entropy(self.out(h).float(), y)


class Shuffled(nn.Module):
    """Residual layers run in an order the training loop sets each step (``order``)."""

    def __init__(self, d_in: int = 32, layers: int = 4, classes: int = 10):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d_in, d_in) for _ in range(layers))
        self.out = nn.Linear(d_in, classes)
        self.order = list(range(layers))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for i in self.order:
            x = x + torch.tanh(self.layers[i](x))
        return F.cross_entropy(self.out(x), y)


def make_model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    models = {"mlp": MLP, "gpt": GPT, "gpt-recompute": lambda: GPT(recompute=True), "twice": Twice,
              "shuffled": Shuffled}
    return models[name]()


def before_step(model: nn.Module, step: int) -> None:
    """What a model changes between steps (the same on every rank): the shuffled stack's order (always
    every layer once: torch's AdamW skips a parameter without a gradient, ZeRO steps it with a zero one)."""
    if isinstance(model, Shuffled):
        n = len(model.layers)
        order = [(i + step // 2) % n for i in range(n)]
        model.order = order[::-1] if step % 2 else order


def batch(name: str, step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step``; the same on every rank."""
    g = torch.Generator().manual_seed(1000 + step)
    if not name.startswith("gpt"):
        x = torch.randn(size, 32, generator=g)
        return x, (x[:, :10].argmax(1) + step) % 10
    start = torch.randint(0, 256, (size, 1), generator=g)
    stride = torch.randint(1, 8, (size, 1), generator=g)
    seq = (start + stride * torch.arange(33)) % 256
    return seq[:, :-1], seq[:, 1:]
