"""ZeRO-Offload and ZeRO-Infinity on CUDA (one rank, NCCL; on the CPU where there is none).

- stage 2 with the optimizer in pinned host memory (HostStore) and the CPU Adam: the
  gradients are copied out, the step runs on the host, the bf16/fp32 weights come back;
  fp32 parity with plain torch AdamW for 10 steps;
- stage 3 with parameters, gradients and optimizer state on NVMe (``offload_param``),
  bf16, the test GPT built under ``partitioned``: the loss must fall; reports the bytes
  the store moved and the device memory peak against the model's size.
Part of gpu_check.sh.

    torchrun --standalone --nproc-per-node 1 benchmarks/gpu_offload_check.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

import zero_comm
from zero_offload import HostStore, NVMeStore
from zero_optim import AdamW, ZeroConfig, ZeroOptimizer, ZeroStage3, partitioned

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "packages" / "zero-optim" / "tests"))
from zero_models import GPT, batch

DEVICE = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def stage2_losses(offload: bool, steps: int) -> list[float]:
    comm = zero_comm.init_distributed()
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = GPT()
    if offload:
        opt = ZeroOptimizer(model.named_parameters(), AdamW(lr=1e-3, weight_decay=0.0), comm=comm,
                            config=ZeroConfig(stage=2), store=HostStore())
    else:
        torch_opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    out = []
    for step in range(steps):
        x, y = (t.to(DEVICE) for t in batch("gpt", step, 16))
        loss = model(x, y)
        if offload:
            opt.backward(loss)
            opt.step()
        else:
            loss.backward()
            torch_opt.step()
            torch_opt.zero_grad()
        out.append(loss.item())
    return out


def infinity(steps: int, offload: bool) -> tuple[list[float], dict]:
    comm = zero_comm.init_distributed()
    torch.manual_seed(0)
    with torch.device(DEVICE), partitioned(comm):
        model = GPT()
    with tempfile.TemporaryDirectory() as swap:
        store = NVMeStore(swap, buffer_bytes=16 << 20) if offload else HostStore()
        config = ZeroConfig(stage=3, precision="bf16", offload_param=offload, unit_numel=250_000,
                            persistence_threshold=1000)
        opt = ZeroStage3(model, AdamW(lr=1e-3, weight_decay=0.0), comm=comm, config=config, store=store)
        if DEVICE.type == "cuda":
            torch.cuda.reset_peak_memory_stats(DEVICE)
        out = []
        for step in range(steps):
            x, y = (t.to(DEVICE) for t in batch("gpt", step, 16))
            loss = model(x, y)
            opt.backward(loss)
            opt.step()
            out.append(loss.item())
        info = {"device_peak_mib": torch.cuda.max_memory_allocated(DEVICE) / 2**20 if DEVICE.type == "cuda" else None,
                "model_states_mib": 16 * sum(p.numel() for p in model.parameters()) / 2**20}
        if isinstance(store, NVMeStore):
            info.update(read_mib=store.stats.bytes_read / 2**20, written_mib=store.stats.bytes_written / 2**20,
                        direct=store.direct, pinned=store._swap.pin)
            store.close()
    return out, info


def main() -> int:
    where = "CUDA" if DEVICE.type == "cuda" else "the CPU"
    want, got = stage2_losses(False, 10), stage2_losses(True, 10)
    err = max(abs(a - b) / abs(b) for a, b in zip(got, want))
    print(f"stage 2 + optimizer in {'pinned ' if torch.cuda.is_available() else ''}host memory, CPU Adam, "
          f"vs torch AdamW on {where}, 10 steps: max relative loss difference {err:.2e}")
    host, host_info = infinity(60, offload=False)
    curve, info = infinity(60, offload=True)
    gap = max(abs(a - b) / abs(b) for a, b in zip(curve, host))
    print(f"stage 3 bf16, optimizer in host memory: loss {host[0]:.3f} -> {host[-1]:.3f}; {host_info}")
    print(f"stage 3 bf16, parameters + gradients + optimizer on NVMe: loss {curve[0]:.3f} -> {curve[-1]:.3f}, "
          f"max relative difference to the host run {gap:.2e}; {info}")
    ok = err <= 1e-4 and curve[-1] < 0.7 * curve[0] and gap <= 2e-2
    print(f"offload on {where}:", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
