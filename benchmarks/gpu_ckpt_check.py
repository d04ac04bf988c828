"""zero-ckpt on the device: activation checkpointing and an async state save, checked where they run.

    torchrun --standalone --nproc-per-node 1 benchmarks/gpu_ckpt_check.py

On CUDA (part of gpu_check.sh), else on the CPU:
- a GPT with dropout, checkpointed per block, against the same model without: loss and every gradient
  bitwise equal (the CUDA generator restored for recomputation), and the device memory allocated at
  the end of the forward for plain, checkpointed and ``cpu_checkpointing`` runs (on CUDA the last keeps
  the block inputs in pinned host memory, so the device holds even less);
- an async save of CUDA tensors (pinned staging), changed right after ``save`` returns, reloaded equal to
  what they were when saved.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

import zero_ckpt
import zero_comm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "packages" / "zero-ckpt" / "tests"))
from test_activation_checkpointing import GPT


def forward_bytes(model: GPT, ckpt: zero_ckpt.ActivationCheckpointing | None, idx: torch.Tensor,
                  device: torch.device) -> tuple[float, list[torch.Tensor], int]:
    torch.manual_seed(42)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
    loss = model(idx, ckpt)
    held = torch.cuda.memory_allocated() - base if device.type == "cuda" else -1
    model.zero_grad()
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()], held


def main() -> int:
    comm = zero_comm.init_distributed()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    idx = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1)).to(device)
    want_loss, want_grads, plain = forward_bytes(GPT().to(device), None, idx, device)
    ok = True
    for label, options in (("checkpointed", {}), ("cpu_checkpointing", {"cpu_checkpointing": True})):
        ckpt = zero_ckpt.ActivationCheckpointing(zero_ckpt.ActivationCheckpointConfig(**options))
        loss, grads, held = forward_bytes(GPT().to(device), ckpt, idx, device)
        equal = loss == want_loss and all(torch.equal(a, b) for a, b in zip(grads, want_grads, strict=True))
        ok &= equal
        print(f"{label:<18} bitwise equal: {equal}; device bytes held after forward: {held:,} "
              f"(plain {plain:,}); offloaded to host: {ckpt.stats.offloaded_bytes:,}")
    with tempfile.TemporaryDirectory() as root:
        t = torch.randn(1 << 20, device=device)
        want = t.clone()
        piece = type("Piece", (), {"start": 0, "stop": t.numel(), "data": t})()
        manager = zero_ckpt.CheckpointManager(root, comm)
        manager.save("a", {"m": {"t": zero_ckpt.FullTensor((t.numel(),), t.dtype, [piece])}}, async_save=True)
        t.zero_()  # training changes the state at once; the checkpoint holds it as it was
        manager.wait()
        same = torch.equal(zero_ckpt.consolidate(root, prefix="m/")["t"], want.cpu())
        ok &= same
        print(f"async save of {t.device} tensors, changed after save returned: reloaded equal: {same}")
    print("zero-ckpt on", device, ":", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
