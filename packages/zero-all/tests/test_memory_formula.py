"""Model states per rank through the engine stay within 1.10x the ZeRO paper's formula, counted by
walking the live tensors of each rank's process (not from counters the code keeps itself).

With Ψ parameters, N ranks and Adam (two moments), the formula's bytes per rank, between
steps with a micro-batch's gradients held, are:

  precision  stage 1             stage 2         stage 3
  bf16       2Ψ + 2Ψ + 12Ψ/N     2Ψ + 14Ψ/N      16Ψ/N
  fp32       4Ψ + 4Ψ + 8Ψ/N      4Ψ + 12Ψ/N      16Ψ/N

(bf16: 16-bit weights and gradients, fp32 masters and moments; fp32: the weights are the masters.)
Buckets of 2^18 elements (an eighth of the model), and DeepSpeed's default ``reduce_bucket_size``
(5e8: one bucket larger than the whole model), whose staging buffer must not outlive the backward.
"""

import pytest
import torch
from torch import nn

import zero_all as deepspeed
from zero_comm.testing import live_tensor_bytes, run_ranks

FORMULA = {
    ("bf16", 1): lambda psi, n: 4 * psi + 12 * psi / n,
    ("bf16", 2): lambda psi, n: 2 * psi + 14 * psi / n,
    ("bf16", 3): lambda psi, n: 16 * psi / n,
    ("fp32", 1): lambda psi, n: 8 * psi + 8 * psi / n,
    ("fp32", 2): lambda psi, n: 4 * psi + 12 * psi / n,
    ("fp32", 3): lambda psi, n: 16 * psi / n,
}


def model_states(precision: str, stage: int, bucket: int) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(8)])  # Ψ ≈ 2.1M, each weight its own unit
    psi = sum(p.numel() for p in model.parameters())
    config = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
              "zero_optimization": {"stage": stage, "reduce_bucket_size": bucket,
                                    "stage3_param_persistence_threshold": 1024},
              "bf16": {"enabled": precision == "bf16"}, "progress_bar": False}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    for _ in range(2):
        engine.backward(engine(torch.randn(4, 512, dtype=dtype)).float().square().mean())
        engine.step()
    engine.backward(engine(torch.randn(4, 512, dtype=dtype)).float().square().mean())  # gradients held
    return {"psi": psi, "bytes": live_tensor_bytes(), "world": engine.dp_world_size}


@pytest.mark.parametrize("bucket", [1 << 18, 500_000_000], ids=["bucket-model/8", "bucket-default"])
@pytest.mark.parametrize("precision, stage", sorted(FORMULA))
def test_model_states_per_rank_are_within_1_1x_the_formula(precision: str, stage: int, bucket: int):
    for r in run_ranks(model_states, 2, precision, stage, bucket):
        want = FORMULA[precision, stage](r["psi"], r["world"])
        assert r["bytes"] <= 1.10 * want, f"{r['bytes'] / 2**20:.2f} MiB > 1.10 x {want / 2**20:.2f} MiB"
        assert r["bytes"] >= 0.95 * want, "the walk must see the model states"
