"""Model states per rank match the ZeRO formulas, measured from live tensors, and
stages 1 and 2 move the same bytes per step as data parallelism's all-reduce."""

import pytest
import torch
from torch import nn

import zero_comm
from zero_comm.testing import live_tensor_bytes, run_ranks
from zero_optim import AdamW, ZeroConfig, ZeroOptimizer

BUCKET = 1 << 18


def model_states(stage: int) -> dict:
    comm = zero_comm.init_distributed()
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(8)])  # Ψ ≈ 2.1M
    psi = sum(p.numel() for p in model.parameters())
    opt = ZeroOptimizer(model.parameters(), AdamW(), comm=comm,
                        config=ZeroConfig(stage=stage, precision="bf16", bucket_numel=BUCKET))
    x = torch.randn(4, 512, dtype=torch.bfloat16)
    opt.backward(model(x).float().square().mean())
    opt.step()
    opt.backward(model(x).float().square().mean())  # states as they are between steps: grads held
    del x
    return {"psi": psi, "bytes": live_tensor_bytes(), "world": comm.world_size}


@pytest.mark.parametrize("stage, formula", [(1, lambda psi, n: 2 * psi + 2 * psi + 12 * psi / n),
                                            (2, lambda psi, n: 2 * psi + 14 * psi / n)])
@pytest.mark.parametrize("world_size", [2, 4])
def test_model_states_follow_the_zero_formula(stage, formula, world_size):
    for r in run_ranks(model_states, world_size, stage):
        want = formula(r["psi"], r["world"]) + 2 * BUCKET * 2  # plus up to two bf16 buckets in flight
        assert r["bytes"] <= 1.05 * want, f"{r['bytes'] / 2**20:.2f} MiB > 1.05 x {want / 2**20:.2f} MiB"
        assert r["bytes"] >= 0.95 * formula(r["psi"], r["world"]), "the walk must see the model states"


def step_traffic(stage: int) -> dict:
    comm = zero_comm.init_distributed()
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)])
    opt = ZeroOptimizer(model.parameters(), AdamW(), comm=comm,
                        config=ZeroConfig(stage=stage, precision="bf16", bucket_numel=1 << 16))
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    with comm.ledger.measure() as traffic:
        opt.backward(model(x).float().square().mean())
        opt.step()
    big = {k: traffic.entry(k) for k in ("all_reduce", "reduce_scatter", "all_gather")}
    return {"psi": sum(p.numel() for p in model.parameters()),
            "bus": {k: e.bus_bytes for k, e in big.items()}, "payload": {k: e.payload_bytes for k, e in big.items()}}


@pytest.mark.parametrize("world_size", [2, 4])
def test_stages_1_and_2_move_what_an_all_reduce_moves(world_size):
    ddp = run_ranks(step_traffic, world_size, 0)[0]
    n, psi = world_size, ddp["psi"]
    ideal = 2 * (n - 1) / n * psi * 2  # ring all-reduce of Ψ bf16 elements
    assert ideal <= ddp["bus"]["all_reduce"] <= 1.02 * ideal
    for stage in (1, 2):
        r = run_ranks(step_traffic, world_size, stage)[0]
        moved = r["bus"]["reduce_scatter"] + r["bus"]["all_gather"]
        assert abs(moved - ddp["bus"]["all_reduce"]) <= 0.001 * moved, (stage, r, ddp)
        assert r["payload"]["reduce_scatter"] == r["payload"]["all_gather"]  # Ψ each way
        assert r["bus"]["all_reduce"] <= 16, "stages 1-2 all-reduce only the gradient norm"
