"""Stage 3 memory and traffic, measured: partitioned construction never holds the whole model,
model states during a step follow 16Ψ/N, and a step moves 3Ψ parameter-dtype elements."""

import pytest
import torch
from test_optim_memory_and_comm import live_tensor_bytes
from torch import nn

import zero_comm
from zero_comm.testing import run_ranks
from zero_kernels import peak_memory
from zero_optim import AdamW, PartitionedParameter, ZeroConfig, ZeroStage3, partitioned

WIDTH, LAYERS = 512, 8
LAYER_NUMEL = WIDTH * WIDTH + WIDTH


def stack() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])


def construction(budget: int) -> dict:
    comm = zero_comm.init_distributed()
    holder: dict = {}

    def build() -> None:
        with partitioned(comm):
            holder["model"] = stack()

    peak = peak_memory(build)
    model = holder["model"]
    return {"peak": peak, "live": live_tensor_bytes(), "psi": sum(p.numel() for p in model.parameters()),
            "all_partitioned": all(isinstance(p, PartitionedParameter) for p in model.parameters()),
            "world": comm.world_size, "budget": budget}


@pytest.mark.parametrize("world_size", [2, 4])
def test_partitioned_construction_never_holds_the_whole_model(world_size):
    full_bytes = LAYERS * LAYER_NUMEL * 4
    budget = full_bytes * 2 // 3  # a per-rank budget the whole model would break
    for r in run_ranks(construction, world_size, budget):
        assert r["all_partitioned"]
        want = (r["psi"] / r["world"] + LAYER_NUMEL) * 4  # this rank's shards plus one layer, fp32
        assert r["peak"] <= 1.05 * want, f"peak {r['peak'] / 2**20:.2f} MiB > {want / 2**20:.2f} MiB"
        assert r["peak"] < budget < full_bytes
        assert r["live"] <= 1.05 * r["psi"] / r["world"] * 4, "after construction only the shards remain"


def training_memory(max_live_layers: int) -> dict:
    comm = zero_comm.init_distributed()
    model = stack()
    config = ZeroConfig(stage=3, precision="bf16", persistence_threshold=0, prefetch_numel=LAYER_NUMEL,
                        max_live_numel=max_live_layers * LAYER_NUMEL)
    opt = ZeroStage3(model, AdamW(), comm=comm, config=config)
    x = torch.randn(4, WIDTH, dtype=torch.bfloat16)

    def train_step() -> None:
        opt.backward(model(x).float().square().mean())
        opt.step()

    train_step()  # state tensors exist from here on
    base = live_tensor_bytes()
    peak = peak_memory(train_step)
    return {"psi": sum(p.numel() for p in model.parameters()), "world": comm.world_size, "base": base,
            "peak": base + peak, "counts": dict(opt.gather_counts)}


@pytest.mark.parametrize("world_size", [2, 4])
def test_model_states_during_a_step_follow_16_psi_over_n(world_size):
    max_live_layers = 2
    for r in run_ranks(training_memory, world_size, max_live_layers):
        states = 16 * r["psi"] / r["world"]  # bf16 weights and gradients, fp32 master, Adam's two moments
        assert r["base"] <= 1.05 * states + 64 * 1024, f"between steps {r['base'] / 2**20:.2f} MiB"
        # The configured buffers: the live parameters (max_live_numel) and two units of gradients in flight
        # to their owners (bf16); and what autograd itself holds for a moment: one layer's weight gradient,
        # computed in fp32 for a bf16 matmul on CPU, plus the activations of a 4-row batch (~0.1 MiB).
        buffers = 2 * (max_live_layers * LAYER_NUMEL + 2 * LAYER_NUMEL) + 4 * LAYER_NUMEL + 2**20
        assert r["peak"] <= 1.05 * states + buffers, (f"peak {r['peak'] / 2**20:.2f} MiB > "
                                                     f"{(1.05 * states + buffers) / 2**20:.2f} MiB")
        assert r["counts"]["prefetched"] > 0


def step_traffic(persist: int) -> dict:
    comm = zero_comm.init_distributed()
    model = stack()
    opt = ZeroStage3(model, AdamW(), comm=comm, config=ZeroConfig(stage=3, precision="bf16",
                                                                  persistence_threshold=persist))
    x = torch.randn(4, WIDTH, dtype=torch.bfloat16)
    opt.backward(model(x).float().square().mean())
    opt.step()
    with comm.ledger.measure() as traffic:
        opt.backward(model(x).float().square().mean())
        opt.step()
    return {"psi": sum(p.numel() for p in model.parameters()),
            "payload": {k: traffic.entry(k).payload_bytes for k in ("all_gather", "reduce_scatter", "all_reduce")}}


@pytest.mark.parametrize("world_size", [2, 4])
def test_a_step_moves_three_psi(world_size):
    r = run_ranks(step_traffic, world_size, 0)[0]
    psi_bytes = r["psi"] * 2  # bf16
    gathered, scattered = r["payload"]["all_gather"], r["payload"]["reduce_scatter"]
    assert abs(gathered - 2 * psi_bytes) <= 0.05 * 2 * psi_bytes, "one all-gather in forward, one in backward"
    assert abs(scattered - psi_bytes) <= 0.05 * psi_bytes, "one reduce-scatter of the gradients"
    assert r["payload"]["all_reduce"] <= 16, "only the gradient norm is all-reduced"


def backward_peak(layers: int) -> dict:
    import zero_models

    comm = zero_comm.init_distributed()
    torch.manual_seed(0)
    model = zero_models.GPT(layers=layers, recompute=True)  # the head reads the token embedding (tied)
    config = ZeroConfig(stage=3, unit_numel=250_000, persistence_threshold=1000, prefetch_numel=0)
    opt = ZeroStage3(model, AdamW(), comm=comm, config=config)
    x, y = zero_models.batch("gpt", 0, 2)
    opt.backward(model(x, y))  # record the order
    opt.step()
    loss = model(x, y)
    block = sum(p.numel() for p in model.blocks[0].parameters()) * 4
    return {"peak": peak_memory(lambda: opt.backward(loss)), "block": block}


@pytest.mark.parametrize("world_size", [2])
def test_backward_memory_does_not_grow_with_depth_when_embeddings_are_tied(world_size):
    """Each block's gradients go to their owners as soon as they are complete. A tied embedding
    completes only at the very end of backward; it must not hold back the blocks reduced before it."""
    shallow, = run_ranks(backward_peak, world_size, 2)[:1]
    deep, = run_ranks(backward_peak, world_size, 8)[:1]
    assert deep["peak"] - shallow["peak"] <= deep["block"], (
        f"backward peak grows by {(deep['peak'] - shallow['peak']) / deep['block']:.1f} blocks over 6 more blocks")


def gathered_ahead(prefetch_units: float) -> int:
    comm = zero_comm.init_distributed()
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(12)])
    unit = 64 * 64 + 64
    opt = ZeroStage3(model, AdamW(), comm=comm, config=ZeroConfig(
        stage=3, persistence_threshold=0, prefetch_numel=int(prefetch_units * unit)))
    peak = [0]

    def count(module: nn.Module, args: object) -> None:
        peak[0] = max(peak[0], sum(u.gathered or u.in_flight for u in opt.units))

    for layer in model:
        layer.register_forward_pre_hook(count)
    x = torch.randn(4, 64)
    for _ in range(3):  # the first step records the order; the next ones prefetch
        opt.backward(model(x).square().mean())
        opt.step()
    return peak[0]


@pytest.mark.parametrize("world_size", [2])
def test_prefetch_gathers_no_more_than_its_window_ahead(world_size):
    """prefetch_numel bounds what is gathered ahead of the running module, counting gathers already
    under way: with a window of one unit and a bit, the running layer and two ahead at most."""
    assert run_ranks(gathered_ahead, world_size, 1.1)[0] <= 3
    assert run_ranks(gathered_ahead, world_size, 0.5)[0] <= 2
