"""ZeRO-Infinity at scale: train a GPT whose model states do not fit in this machine's memory.

    python benchmarks/offload_scale.py [--layers 29 --d 2560 --vocab 50257] [--steps 2] [--dir /tmp]

A GPT of about 2.4 billion parameters (the defaults) is built under ``partitioned``
in bf16 on one rank, handed to ZeRO stage 3 with ``offload_param``: parameter shards,
gradient shards, fp32 master weights and both Adam moments all live in an
``NVMeStore`` under ``--dir``; the CPU Adam steps them shard by shard through a
``--budget-gib`` buffer pool, on one batch again and again (its loss must
fall). Model states at 16 bytes per parameter are compared
with the machine's RAM; the run reports the time of each phase, peak RSS and the
bytes moved to and from the files. A benchmark run, not a test: it takes minutes.
Writes ``offload_scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import zero_comm
from zero_offload import NVMeStore
from zero_optim import AdamW, ZeroConfig, ZeroStage3, partitioned


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2)
                   for z in self.qkv(self.ln1(x)).split(c, dim=2))
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, block: int, layers: int, d: int, heads: int):
        super().__init__()
        # small initial embeddings (the head reads them too), so the first loss is about ln(vocab)
        self.tok = nn.Embedding(vocab, d, _weight=torch.randn(vocab, d) * 0.02)
        self.pos = nn.Embedding(block, d, _weight=torch.randn(block, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x)).float()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=29)
    parser.add_argument("--d", type=int, default=2560)
    parser.add_argument("--heads", type=int, default=20)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--budget-gib", type=float, default=4.0)
    parser.add_argument("--dir", default="/tmp")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    comm = zero_comm.init_distributed()
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with partitioned(comm, dtype=torch.bfloat16):
        model = GPT(args.vocab, args.seq, args.layers, args.d, args.heads)
    params = sum(p.numel() for p in model.parameters())
    states = 16 * params
    print(f"GPT: {params / 1e9:.2f} B parameters, model states at 16 B/param {states / 2**30:.1f} GiB = "
          f"{states / ram:.2f}x this machine's {ram / 2**30:.1f} GiB RAM; built in {time.perf_counter() - t0:.0f} s, "
          f"peak RSS {_rss_gib():.1f} GiB", flush=True)

    t1 = time.perf_counter()
    store = NVMeStore(args.dir, buffer_bytes=int(args.budget_gib * 2**30), io_threads=4)
    config = ZeroConfig(stage=3, precision="bf16", offload_param=True, unit_numel=100_000_000,
                        persistence_threshold=100_000, prefetch_numel=0)
    opt = ZeroStage3(model, AdamW(lr=1e-4), comm=comm, config=config, store=store)
    store.flush()
    build_s = time.perf_counter() - t1
    print(f"states written to {store.directory} ({'O_DIRECT' if store.direct else 'buffered'}): "
          f"{store.nbytes() / 2**30:.1f} GiB in {build_s:.0f} s; peak RSS {_rss_gib():.1f} GiB", flush=True)

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)  # one batch: its loss must fall
    steps = []
    for step in range(args.steps):
        before = (store.stats.bytes_read, store.stats.bytes_written)
        t = time.perf_counter()
        loss = model(x[:, :-1], x[:, 1:])
        t_fwd = time.perf_counter() - t
        opt.backward(loss)
        t_bwd = time.perf_counter() - t - t_fwd
        assert opt.step()
        t_step = time.perf_counter() - t - t_fwd - t_bwd
        moved = (store.stats.bytes_read - before[0], store.stats.bytes_written - before[1])
        steps.append({"loss": loss.item(), "forward_s": t_fwd, "backward_s": t_bwd, "optimizer_s": t_step,
                      "read_bytes": moved[0], "written_bytes": moved[1]})
        print(f"step {step + 1}: loss {loss.item():.4f}  forward {t_fwd:.0f} s, backward {t_bwd:.0f} s, "
              f"optimizer {t_step:.0f} s; read {moved[0] / 2**30:.1f} GiB, wrote {moved[1] / 2**30:.1f} GiB; "
              f"peak RSS {_rss_gib():.1f} GiB", flush=True)
    result = {
        "params": params, "model_states_bytes": states, "ram_bytes": ram, "states_over_ram": states / ram,
        "swap_bytes": store.nbytes(), "budget_bytes": store.buffer_bytes, "direct": store.direct,
        "build_s": build_s, "steps": steps, "peak_rss_bytes": _rss_gib() * 2**30,
        "prefetched_reads": store.stats.reads_prefetched, "on_demand_reads": store.stats.reads_on_demand,
    }
    store.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "offload_scale.json").write_text(json.dumps(result, indent=2))
    print(f"peak RSS {_rss_gib():.1f} GiB for {states / 2**30:.1f} GiB of model states; wrote "
          f"{out / 'offload_scale.json'}")


if __name__ == "__main__":
    main()
