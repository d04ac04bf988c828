"""DeepSpeed's module-level names behave as DeepSpeed's: deepspeed.comm's collectives, init_distributed and
add_config_arguments, deepspeed.ops.adam's optimizers, deepspeed.checkpointing."""

import argparse

import pytest
import torch
import torch.distributed as dist
from torch import nn

import zero_all as deepspeed
from zero_all.ops.adam import DeepSpeedCPUAdam, FusedAdam
from zero_comm.testing import run_ranks


# -- deepspeed.comm ---------------------------------------------------------------------------------
def collectives() -> dict:
    comm = deepspeed.comm
    comm.init_distributed(dist_init_required=False)  # the harness already joined: nothing to redo
    rank, world = comm.get_rank(), comm.get_world_size()
    out: dict = {"initialized": comm.is_initialized(), "local_rank": comm.get_local_rank()}
    t = torch.tensor([rank + 1.0])
    comm.all_reduce(t)
    out["sum"] = t.item()
    t = torch.tensor([rank + 1.0])
    comm.all_reduce(t, comm.ReduceOp.AVG)
    out["avg"] = t.item()
    t = torch.tensor([rank + 1.0])
    comm.all_reduce(t, dist.ReduceOp.MAX)  # torch's ops are taken too
    out["max"] = t.item()
    gathered = torch.empty(2 * world)
    comm.all_gather_into_tensor(gathered, torch.tensor([rank, 10.0 * rank]))
    out["gathered"] = gathered.tolist()
    parts = [torch.empty(1) for _ in range(world)]
    comm.all_gather(parts, torch.tensor([float(rank)]))
    out["list"] = [p.item() for p in parts]
    mine = torch.empty(2)
    comm.reduce_scatter_tensor(mine, torch.arange(2.0 * world) * (rank + 1))
    out["scattered"] = mine.tolist()
    b = torch.tensor([float(rank)])
    comm.broadcast(b, src=world - 1)
    out["broadcast"] = b.item()
    if world > 1:
        msg = torch.tensor([7.0]) if rank == 0 else torch.zeros(1)
        if rank == 0:
            comm.send(msg, dst=1)
        elif rank == 1:
            comm.recv(msg, src=0)
        out["received"] = msg.item()
    handle = comm.all_reduce(torch.ones(1), async_op=True)
    handle.wait()
    comm.barrier()
    with pytest.raises(ValueError, match=r"reduce op ReduceOp\.BAND is not supported"):
        comm.all_reduce(torch.ones(1), comm.ReduceOp.BAND)
    return out


@pytest.mark.parametrize("world", [1, 2, 4])
def test_comm_collectives_follow_torch_distributed_semantics(world: int):
    n = world
    for rank, got in enumerate(run_ranks(collectives, world)):
        assert got["initialized"] and got["local_rank"] == rank
        assert got["sum"] == n * (n + 1) / 2 and got["avg"] == (n + 1) / 2 and got["max"] == n
        assert got["gathered"] == [v for r in range(n) for v in (r, 10.0 * r)]
        assert got["list"] == [float(r) for r in range(n)]
        total = sum(r + 1 for r in range(n))
        assert got["scattered"] == [total * (2 * rank), total * (2 * rank + 1)]
        assert got["broadcast"] == n - 1
        if n > 1 and rank == 1:
            assert got["received"] == 7.0


def fresh_process_init() -> dict:
    """In a process whose torch.distributed is torn down, as a script starts."""
    dist.destroy_process_group()
    with pytest.raises(RuntimeError, match="init_distributed"):
        deepspeed.comm.get_rank()
    with pytest.raises(ValueError, match="init_method='file:///tmp/x'"):
        deepspeed.init_distributed(init_method="file:///tmp/x")
    with pytest.raises(ValueError, match="rank and world_size together"):
        deepspeed.init_distributed(rank=0)
    with pytest.raises(RuntimeError, match="dist_init_required=False"):
        deepspeed.init_distributed(dist_init_required=False)
    world = deepspeed.init_distributed(dist_backend="gloo", rank=0, world_size=1)
    return {"world": world.world_size, "rank": deepspeed.comm.get_rank(), "backend": dist.get_backend()}


def test_init_distributed_joins_and_checks_its_arguments():
    assert run_ranks(fresh_process_init, 1) == [{"world": 1, "rank": 0, "backend": "gloo"}]


def test_add_config_arguments_adds_deepspeeds_flags():
    parser = deepspeed.add_config_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--deepspeed", "--deepspeed_config", "ds.json"])
    assert (args.deepspeed, args.deepspeed_config, args.deepscale, args.deepscale_config) == (
        True, "ds.json", False, None)
    assert parser.parse_args(["--deepscale_config", "old.json"]).deepscale_config == "old.json"


# -- deepspeed.ops.adam -------------------------------------------------------------------------------
def train(make_opt, dtype: torch.dtype = torch.float32, steps: int = 5) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1)).to(dtype)
    opt = make_opt(model.parameters())
    for step in range(steps):
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(step)).to(dtype)
        model(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().float() for p in model.parameters()]


@pytest.mark.parametrize("cls", [FusedAdam, DeepSpeedCPUAdam])
@pytest.mark.parametrize("decoupled", [True, False])
def test_deepspeed_adams_step_like_torch(cls, decoupled: bool):
    mode = {"adam_w_mode": decoupled} if cls is FusedAdam else {"adamw_mode": decoupled}
    got = train(lambda ps: cls(ps, lr=1e-2, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.1, **mode))
    ref = torch.optim.AdamW if decoupled else torch.optim.Adam
    want = train(lambda ps: ref(ps, lr=1e-2, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.1))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)
    opt = cls([nn.Parameter(torch.zeros(2))], lr=3e-4, **mode)
    assert opt.defaults["adam_w_mode"] is decoupled and opt.param_groups[0]["lr"] == 3e-4
    assert isinstance(opt, torch.optim.Optimizer) and opt.param_groups[0]["betas"] == (0.9, 0.999)


def test_bf16_parameters_step_through_an_fp32_master():
    got = train(lambda ps: FusedAdam(ps, lr=1e-2), dtype=torch.bfloat16, steps=3)
    want = train(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0), dtype=torch.float32, steps=3)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=3e-2, atol=3e-2)  # bf16 weights and gradients


def test_adam_options_zero_lacks_are_refused():
    params = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(NotImplementedError, match="amsgrad"):
        FusedAdam(params, amsgrad=True)
    with pytest.raises(NotImplementedError, match="bias_correction=False"):
        DeepSpeedCPUAdam(params, bias_correction=False)
    with pytest.raises(NotImplementedError, match="fp32_optimizer_states=False"):
        DeepSpeedCPUAdam(params, fp32_optimizer_states=False)


# -- deepspeed.checkpointing --------------------------------------------------------------------------
def grads_of(run) -> list[torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 1))
    x = torch.randn(3, 4, requires_grad=True)
    torch.manual_seed(1)
    run(net, x).sum().backward()
    return [x.grad, *(p.grad for p in net.parameters())]


def test_checkpoint_recomputes_with_the_same_dropout_and_gradients():
    want = grads_of(lambda net, x: net(x))
    got = grads_of(deepspeed.checkpointing.checkpoint)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def configured_by_the_engine() -> tuple[bool, bool]:
    before = deepspeed.checkpointing.is_configured()
    config = {"train_batch_size": 2, "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
              "activation_checkpointing": {"cpu_checkpointing": True, "number_checkpoints": 2}}
    deepspeed.initialize(model=nn.Linear(2, 2), config=config)
    return before, deepspeed.checkpointing.is_configured()


def test_the_engine_applies_the_activation_checkpointing_block():
    assert run_ranks(configured_by_the_engine, 1) == [(False, True)]
    with pytest.raises(ValueError, match="contiguous_checkpointing needs partition_activations"):
        deepspeed.checkpointing.configure(None, deepspeed_config={
            "train_batch_size": 2, "activation_checkpointing": {"contiguous_memory_optimization": True}})


def test_model_parallel_seed_gives_a_separate_stream():
    deepspeed.checkpointing.model_parallel_cuda_manual_seed(5)
    with deepspeed.checkpointing.get_cuda_rng_tracker().fork("model-parallel-rng"):
        forked = torch.rand(3)
    outside = torch.rand(3)
    torch.manual_seed(5 + 2718)
    assert torch.equal(forked, torch.rand(3))
    torch.manual_seed(5)
    assert torch.equal(outside, torch.rand(3))
