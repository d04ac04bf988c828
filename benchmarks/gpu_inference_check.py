"""Inference's inner parts on CUDA (on the CPU where there is none), without zero_all (the GPU machine
has no msgspec): the project's GPT decoding with zero_pipe.KVCache token-identical to the eager loop;
int8 weights (zero_kernels.quantize_weights_, the Triton dequantisation on CUDA) close to fp32; layers
streamed from pinned host memory (zero_offload.LayerStreamer, side-stream copies) giving the same
logits with at most two layers' weights on the device; and tokens per second, cached vs recomputed.
Part of gpu_check.sh.

    python3 benchmarks/gpu_inference_check.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

import zero_kernels
import zero_offload
from zero_pipe import KVCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from gpt import GPT, GPTConfig

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CFG = GPTConfig(vocab_size=512, block_size=256, n_layer=6, n_head=8, n_embd=512)


def build() -> GPT:
    torch.manual_seed(0)
    return GPT(CFG).eval().to(DEVICE)


@torch.inference_mode()
def cached(model: GPT, ids: torch.Tensor, new: int) -> torch.Tensor:
    cache = KVCache(ids.shape[1] + new)
    step = ids
    for _ in range(new):
        nxt = model(step, kv_cache=cache)[:, -1].argmax(-1, keepdim=True)
        ids, step = torch.cat([ids, nxt], 1), nxt
    return ids


@torch.inference_mode()
def recomputed(model: GPT, ids: torch.Tensor, new: int) -> torch.Tensor:
    for _ in range(new):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


def timed(fn, *args) -> tuple[torch.Tensor, float]:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    out = fn(*args)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - began


def main() -> int:
    ok = True
    model = build()
    ids = torch.randint(0, CFG.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    new = 64
    cached(model, ids, 4)  # warm-up
    want, t_eager = timed(recomputed, model, ids, new)
    got, t_cache = timed(cached, model, ids, new)
    same = torch.equal(got, want)
    ok &= same
    print(f"KV cache on {DEVICE}: tokens identical to the eager loop: {same}; {4 * new / t_cache:.0f} tokens/s "
          f"cached vs {4 * new / t_eager:.0f} recomputed ({t_eager / t_cache:.2f}x)")

    int8 = build()
    done = zero_kernels.quantize_weights_(int8)
    with torch.inference_mode():
        ref, q = model(want), int8(want)
    rel = ((q - ref).abs().max() / ref.abs().max()).item()
    agree = (q.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"int8 weights (Triton dequantisation: {zero_kernels.use_triton(want)}): {done.ratio:.3f}x the bytes, "
          f"logits max error {rel:.2e} of the largest, argmax agreement {agree:.1%}")
    ok &= done.ratio <= 0.3 and rel < 0.05

    streamed = build()
    layer = max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in streamed.blocks)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    with zero_offload.LayerStreamer(list(streamed.blocks), zero_offload.HostStore(), device=DEVICE) as streamer:
        del streamer
        if DEVICE.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        with torch.inference_mode():
            out = streamed(want)
        equal = torch.equal(out, ref)
        peak = (torch.cuda.max_memory_allocated() - base) if DEVICE.type == "cuda" else 0
    print(f"layers streamed from host memory: logits identical {equal}; device peak above the resident part "
          f"{peak / 2**20:.1f} MiB (a layer is {layer / 2**20:.1f} MiB; activations included)")
    ok &= equal
    print("gpu_inference_check:", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
