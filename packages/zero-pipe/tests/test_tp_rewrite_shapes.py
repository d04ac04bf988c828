"""tensor_parallelize on the layouts Hugging Face models use: GPT-2's Conv1D (a linear stored transposed,
a fused QKV split by ``split_size``) and Llama's separate q/k/v projections with grouped key/value heads
and a gated MLP. Split over 2 ranks each computes exactly the whole model's output; a head count the
degree does not divide is refused before anything is changed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zero_comm
from zero_comm.testing import run_ranks
from zero_pipe import tensor_parallelize


class Conv1D(nn.Module):
    """The shape of Hugging Face's Conv1D: weight (in, out), y = x W + b."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, self.nx), self.weight).view(*x.shape[:-1], self.nf)


class GPT2Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.num_heads, self.head_dim, self.split_size = heads, width // heads, width
        self.c_attn, self.c_proj = Conv1D(3 * width, width), Conv1D(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (z.view(*x.shape[:-1], -1, self.head_dim).transpose(1, 2)
                   for z in self.c_attn(x).split(self.split_size, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(*x.shape[:-1], -1))


class LlamaAttention(nn.Module):
    def __init__(self, width: int, heads: int, kv_heads: int):
        super().__init__()
        self.head_dim, self.groups = width // heads, heads // kv_heads
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(width, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (p(x).view(*x.shape[:-1], -1, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        k, v = k.repeat_interleave(self.groups, dim=1), v.repeat_interleave(self.groups, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(*x.shape[:-1], -1))


class GatedMLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(width, 2 * width, bias=False), nn.Linear(width, 2 * width, bias=False)
        self.down_proj = nn.Linear(2 * width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, kind: str, heads: int, kv_heads: int):
        super().__init__()
        self.attn = GPT2Attention(32, heads) if kind == "gpt2" else LlamaAttention(32, heads, kv_heads)
        self.mlp = GatedMLP(32) if kind == "llama" else nn.Sequential(Conv1D(64, 32), nn.GELU(), Conv1D(32, 64))
        if kind == "gpt2":  # GPT-2's names for its MLP
            self.mlp = nn.ModuleDict({"c_fc": self.mlp[0], "c_proj": self.mlp[2]})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        if isinstance(self.mlp, nn.ModuleDict):
            return x + self.mlp["c_proj"](F.gelu(self.mlp["c_fc"](x)))
        return x + self.mlp(x)


def split_output(kind: str, heads: int, kv_heads: int) -> dict:
    comm = zero_comm.init_distributed()
    torch.manual_seed(0)
    model = Block(kind, heads, kv_heads)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    want = model(x)
    try:
        names = tensor_parallelize(model, comm)
    except ValueError as exc:
        return {"error": str(exc), "untouched": torch.equal(model(x), want)}
    return {"names": names, "match": torch.allclose(model(x), want, rtol=1e-5, atol=1e-6),
            "heads": getattr(model.attn, "num_heads", None), "split": getattr(model.attn, "split_size", None)}


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_split_over_two_ranks_computes_the_whole_models_output(kind: str):
    for r in run_ranks(split_output, 2, kind, 4, 2):
        assert r["match"], r
        if kind == "gpt2":
            assert r["names"] == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
            assert (r["heads"], r["split"]) == (2, 16)  # each rank's heads, and their width for the QKV split
        else:
            assert r["names"] == ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj",
                                  "mlp.up_proj", "mlp.down_proj"]


def test_heads_the_degree_does_not_divide_are_refused_before_any_change():
    for r in run_ranks(split_output, 2, "llama", 4, 1):  # one key/value head cannot be split over 2 ranks
        assert r["error"] == ("attn has 1 attention heads in this projection (of 8 features each), not divisible "
                              "by the tensor-parallel degree 2"), r
        assert r["untouched"]
