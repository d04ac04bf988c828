"""A small GPT and the data the examples train it on; read it in one sitting.

- :class:`GPT`: token and position embeddings, pre-norm blocks, an output head tied
  to the token embedding. The attention splits its fused ``qkv`` projection with
  ``chunk(3)`` and reshapes by a fixed head size, so the same code runs whole, under
  ZeRO-3's partitioned construction, and with its linears rewritten tensor-parallel
  by :func:`zero_pipe.tensor_parallelize` (each rank then holds some of the heads).
- :class:`CharCorpus`: a character-level corpus from the Python standard library's own
  source files -- a text every machine with Python already has, so nothing downloads.
- :func:`global_batch`: a synthetic task (continue an arithmetic sequence modulo the
  vocabulary) for tests that need a loss that falls within a few steps.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


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
        self.head_dim = cfg.n_embd // cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)  # a key bias gets no gradient
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor, cache=None, layer: int = 0) -> torch.Tensor:
        b, t, _ = x.shape
        # by the head size, not the head count: a tensor-parallel rank holds only some heads
        q, k, v = (z.reshape(b, t, -1, self.head_dim).transpose(1, 2) for z in self.qkv(x).chunk(3, dim=2))
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # decoding: attend over the keys and values the cache holds for this layer
            mask = cache.attention_mask(t, x.device)
            causal = cache.offset == 0 and t > 1
            k, v = cache.update(layer, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        hidden = 4 * cfg.n_embd
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, hidden), nn.GELU(), nn.Linear(hidden, cfg.n_embd))

    def forward(self, x: torch.Tensor, cache=None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache, layer)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """``model(idx, targets)`` is the mean cross-entropy; ``model(idx)`` the logits.

    ``model(idx, kv_cache=cache)`` decodes with a key/value cache (``zero_pipe.KVCache``):
    ``idx`` holds only the tokens after the ``cache.offset`` already stored."""

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

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache=None) -> torch.Tensor:
        start = kv_cache.offset if kv_cache is not None else 0
        x = self.tok(idx) + self.pos(torch.arange(start, start + idx.shape[1], device=idx.device))
        for i, block in enumerate(self.blocks):
            x = block(x, kv_cache, i)
        if kv_cache is not None:
            kv_cache.advance(idx.shape[1])
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int, block_size: int,
             temperature: float = 0.8, seed: int = 0) -> torch.Tensor:
    """Sample ``new_tokens`` after ``prompt`` (1-D). Deterministic for a seed, so every rank of a
    partitioned model takes the same path and joins the same gathers."""
    g = torch.Generator().manual_seed(seed)
    idx = prompt.clone()
    for _ in range(new_tokens):
        logits = model(idx[-block_size:].unsqueeze(0))[0, -1].float()
        probs = torch.softmax(logits / temperature, dim=-1).cpu()
        idx = torch.cat([idx, torch.multinomial(probs, 1, generator=g).to(idx.device)])
    return idx


class CharCorpus:
    """The standard library's top-level ``*.py`` files (sorted by name) as one string of printable
    ASCII characters plus newline; anything else becomes ``?``. ``vocab_size`` is 96."""

    CHARS = "\n" + "".join(chr(c) for c in range(32, 127))

    def __init__(self, max_chars: int = 4_000_000, root: str | Path | None = None):
        root = Path(root or sysconfig.get_paths()["stdlib"])
        files = sorted(root.glob("*.py"))
        if not files:
            raise FileNotFoundError(f"no *.py files under {root}: cannot build the corpus")
        table = {c: i for i, c in enumerate(self.CHARS)}
        unknown = table["?"]
        parts: list[str] = []
        size = 0
        for path in files:
            text = path.read_text(encoding="utf-8", errors="replace").replace("\t", "    ")
            parts.append(text)
            size += len(text)
            if size >= max_chars:
                break
        text = "".join(parts)[:max_chars]
        self.data = torch.tensor([table.get(c, unknown) for c in text], dtype=torch.long)
        self.files = len(parts)

    @property
    def vocab_size(self) -> int:
        return len(self.CHARS)

    def encode(self, text: str) -> torch.Tensor:
        unknown = self.CHARS.index("?")
        return torch.tensor([self.CHARS.find(c) if c in self.CHARS else unknown for c in text], dtype=torch.long)

    def decode(self, ids: torch.Tensor) -> str:
        return "".join(self.CHARS[i] for i in ids.tolist())

    def batch(self, step: int, batch_size: int, block_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` random windows (the same on every rank for the same step and seed)."""
        g = torch.Generator().manual_seed(seed * 100_003 + step)
        starts = torch.randint(0, len(self.data) - block_size - 1, (batch_size, 1), generator=g)
        window = self.data[starts + torch.arange(block_size + 1)]
        return window[:, :-1], window[:, 1:]


def global_batch(step: int, batch_size: int, cfg: GPTConfig, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences start + i * stride (mod vocab); the model learns to continue them. Same on every rank."""
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    start = torch.randint(0, cfg.vocab_size, (batch_size, 1), generator=g)
    stride = torch.randint(1, 8, (batch_size, 1), generator=g)
    seq = (start + stride * torch.arange(cfg.block_size + 1)) % cfg.vocab_size
    return seq[:, :-1], seq[:, 1:]
