"""A tiny GPT written as a list of pipeline layers, and the same model as one plain torch module.

Layer ``i`` of both is built right after ``torch.manual_seed(SEED + i)`` (the tied
embedding/head after the seed of the embedding), so the pipeline's stages and the
single-process reference start from identical weights whatever the cut.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zero_pipe import LayerSpec, TiedLayerSpec

SEED = 1234
VOCAB, BLOCK, EMBD, HEADS = 32, 8, 16, 2


class Embedding(nn.Module):
    def __init__(self, vocab: int = VOCAB, block: int = BLOCK, embd: int = EMBD):
        super().__init__()
        self.tok = nn.Embedding(vocab, embd)
        self.pos = nn.Embedding(block, embd)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.tok(idx) + self.pos(torch.arange(idx.shape[1]))


def head(emb: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The output head: logits through the transposed token embedding (tied weights)."""
    return x @ emb.tok.weight.t()


class Attention(nn.Module):
    def __init__(self, embd: int = EMBD, heads: int = HEADS):
        super().__init__()
        self.n_head = heads
        self.qkv = nn.Linear(embd, 3 * embd)
        self.proj = nn.Linear(embd, embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=2)
        q, k, v = (z.reshape(b, t, self.n_head, -1).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, embd: int = EMBD, heads: int = HEADS):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(embd), nn.LayerNorm(embd)
        self.attn = Attention(embd, heads)
        self.mlp = nn.Sequential(nn.Linear(embd, 4 * embd), nn.GELU(), nn.Linear(4 * embd, embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def layers(n_blocks: int, *, tied: bool = True) -> list:
    """Embedding, ``n_blocks`` blocks, a final norm and the head: ``n_blocks + 3`` layers."""
    first = TiedLayerSpec("embed", Embedding) if tied else LayerSpec(Embedding)
    last = TiedLayerSpec("embed", Embedding, forward_fn=head) if tied else LayerSpec(nn.Linear, EMBD, VOCAB,
                                                                                      bias=False)
    return [first, *[LayerSpec(Block) for _ in range(n_blocks)], LayerSpec(nn.LayerNorm, EMBD), last]


class Reference(nn.Module):
    """The same model, whole, in one process; ``params[name]`` uses the pipeline's parameter names."""

    def __init__(self, n_blocks: int, *, tied: bool = True):
        super().__init__()
        specs = layers(n_blocks, tied=tied)
        built = []
        for i, spec in enumerate(specs):
            torch.manual_seed(SEED + i)
            built.append(spec.build())
        self.tied = tied
        self.stack = nn.ModuleList(built[:-1] if tied else built)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = idx
        for layer in self.stack:
            x = layer(x)
        return head(self.stack[0], x) if self.tied else x

    def pipeline_names(self) -> dict[str, torch.Tensor]:
        """Every parameter under the name the pipeline stages give it."""
        out = {}
        for i, layer in enumerate(self.stack):
            for name, p in layer.named_parameters():
                out[f"tied.embed.{name}" if self.tied and i == 0 else f"layers.{i}.{name}"] = p
        return out


def batches(count: int, size: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        seq = torch.randint(0, VOCAB, (size, BLOCK + 1), generator=g)
        out.append((seq[:, :-1], seq[:, 1:]))
    return out


def reference_run(n_blocks: int, steps: int, lr: float = 0.1, *, tied: bool = True,
                  ) -> tuple[list[float], float, dict[str, torch.Tensor]]:
    """Plain torch: SGD(momentum) on whole batches; losses, a final no-grad eval loss, weights by pipeline name."""
    model = Reference(n_blocks, tied=tied)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    data = batches(steps + 1)
    losses = []
    for x, y in data[:steps]:
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    with torch.no_grad():
        evaluation = loss_fn(model(data[steps][0]), data[steps][1]).item()
    return losses, evaluation, {k: v.detach().clone() for k, v in model.pipeline_names().items()}
