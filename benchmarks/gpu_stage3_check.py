"""ZeRO stage 3 on CUDA (one rank, NCCL; on the CPU where there is none): fp32 parity with plain torch
AdamW for 10 steps, then a bf16 run of the test GPT (tied embeddings; its init
loop uses ``gathered``) built under ``partitioned`` whose loss must fall.
Part of gpu_check.sh.

    torchrun --standalone --nproc-per-node 1 benchmarks/gpu_stage3_check.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import zero_comm
from zero_optim import AdamW, ZeroConfig, ZeroStage3, partitioned

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "packages" / "zero-optim" / "tests"))
from zero_models import GPT, batch


def losses(stage3: bool, steps: int, precision: str = "fp32", build_partitioned: bool = False) -> list[float]:
    comm = zero_comm.init_distributed()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(0)
    with torch.device(device):
        if build_partitioned:
            with partitioned(comm):
                model = GPT()
        else:
            model = GPT()
    if stage3:
        opt = ZeroStage3(model, AdamW(lr=1e-3, weight_decay=0.0), comm=comm,
                         config=ZeroConfig(stage=3, precision=precision, persistence_threshold=0))
    else:
        torch_opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    out = []
    for step in range(steps):
        x, y = (t.to(device) for t in batch("gpt", step, 16))
        loss = model(x, y)
        if stage3:
            opt.backward(loss)
            opt.step()
        else:
            loss.backward()
            torch_opt.step()
            torch_opt.zero_grad()
        out.append(loss.item())
    return out


def main() -> int:
    want, got = losses(False, 10), losses(True, 10)
    err = max(abs(a - b) / abs(b) for a, b in zip(got, want))
    where = "CUDA" if torch.cuda.is_available() else "the CPU"
    print(f"stage 3 fp32 vs torch AdamW on {where}, 10 steps: max relative loss difference {err:.2e}")
    curve = losses(True, 60, "bf16", build_partitioned=True)
    print(f"stage 3 bf16, partitioned construction: loss {curve[0]:.3f} -> {curve[-1]:.3f}")
    ok = err <= 1e-4 and curve[-1] < 0.7 * curve[0]
    print("stage 3 on", "CUDA:" if torch.cuda.is_available() else "the CPU:", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
