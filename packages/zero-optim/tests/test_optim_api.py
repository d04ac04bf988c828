"""Parameter groups, frozen and unused parameters, other rules, state round trips, and bad input."""

import pytest
import torch
import zero_models
from torch import nn

import zero_comm
from zero_comm.testing import run_ranks
from zero_optim import LAMB, SGD, AdamW, Lion, ZeroConfig, ZeroOptimizer, build_layout


def test_layout_balances_shards_and_keeps_parameters_whole():
    params = [nn.Parameter(torch.zeros(n)) for n in (10, 300, 7, 5000, 3)]
    layout = build_layout(params, world_size=4, bucket_numel=400, align=8)
    # reverse order, whole params; the 5000-element one gets a bucket of its own
    assert [[p.numel() for p in b.params] for b in layout.buckets] == [[3], [5000], [7, 300, 10]]
    for b in layout.buckets:
        assert b.padded % (4 * 8) == 0 and b.padded >= b.numel and b.chunk * 4 == b.padded
    assert layout.shard_numel == sum(b.chunk for b in layout.buckets)
    assert sorted(map(id, layout.params)) == sorted(map(id, params))


def groups_frozen_and_unused() -> dict:
    comm = zero_comm.init_distributed()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    unused = nn.Linear(8, 8)  # never called: gets no gradient
    model[0].bias.requires_grad_(False)  # frozen
    decay = [model[0].weight, model[2].weight, unused.weight]
    no_decay = [model[1].weight, model[1].bias, model[2].bias, unused.bias, model[0].bias]
    frozen_before = model[0].bias.detach().clone()
    unused_before = unused.weight.detach().clone()
    opt = ZeroOptimizer([{"params": decay, "weight_decay": 0.5}, {"params": no_decay, "weight_decay": 0.0}],
                        AdamW(lr=0.1), comm=comm, config=ZeroConfig(stage=2, bucket_numel=50))
    for step in range(3):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
        opt.backward(model(x).square().mean())
        assert opt.step()
    assert torch.equal(model[0].bias, frozen_before), "frozen parameters are left alone"
    # an unused parameter gets zero gradient: only decoupled weight decay moves it
    assert torch.allclose(unused.weight, unused_before * (1 - 0.1 * 0.5) ** 3, rtol=1e-6)
    assert opt.param_groups[1]["weight_decay"] == 0.0 and opt.param_groups[0]["lr"] == 0.1
    return {"ok": True}


@pytest.mark.parametrize("world_size", [1, 2])
def test_groups_frozen_and_unused_parameters(world_size):
    assert all(r["ok"] for r in run_ranks(groups_frozen_and_unused, world_size))


def other_rules(rule_name: str) -> list[float]:
    comm = zero_comm.init_distributed()
    model = zero_models.make_model("mlp")
    rule = {"lion": Lion(lr=1e-3), "sgd": SGD(lr=0.05, momentum=0.9)}[rule_name]
    opt = ZeroOptimizer(model.parameters(), rule, comm=comm, config=ZeroConfig(stage=1, bucket_numel=3000))
    per = 8 // comm.world_size
    losses = []
    for step in range(10):
        x, y = zero_models.batch("mlp", step, 8)
        loss = model(x[comm.rank * per:(comm.rank + 1) * per], y[comm.rank * per:(comm.rank + 1) * per])
        opt.backward(loss)
        opt.step()
        losses.append(comm.all_reduce(loss.detach(), "avg").item())
    return losses


@pytest.mark.parametrize("rule_name", ["lion", "sgd"])
def test_lion_and_sgd_match_their_torch_loops(rule_name):
    torch.manual_seed(0)
    model = zero_models.make_model("mlp")
    if rule_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:  # torch has no Lion: the same update written out
        opt = None
        exp_avg = [torch.zeros_like(p) for p in model.parameters()]
    want = []
    for step in range(10):
        x, y = zero_models.batch("mlp", step, 8)
        loss = model(x, y)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad()
        else:
            with torch.no_grad():
                for p, m in zip(model.parameters(), exp_avg):
                    p.add_(torch.sign(0.9 * m + 0.1 * p.grad), alpha=-1e-3)
                    m.mul_(0.99).add_(p.grad, alpha=0.01)
                    p.grad = None
        want.append(loss.item())
    got = run_ranks(other_rules, 2, rule_name)[0]
    assert max(abs(a - b) / abs(b) for a, b in zip(got, want)) <= 1e-5


def state_round_trip() -> bool:
    comm = zero_comm.init_distributed()
    model = zero_models.make_model("mlp")
    opt = ZeroOptimizer(model.parameters(), AdamW(lr=1e-2), comm=comm, config=ZeroConfig(stage=2, bucket_numel=3000))
    for step in range(2):
        x, y = zero_models.batch("mlp", step, 8)
        opt.backward(model(x, y))
        opt.step()
    saved = opt.state_dict()
    weights = [p.detach().clone() for p in model.parameters()]
    x, y = zero_models.batch("mlp", 5, 8)
    opt.backward(model(x, y))
    opt.step()
    opt.load_state_dict(saved)
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters())), "weights restored"
    assert opt.step_count == 2
    mismatched = dict(saved, world_size=saved["world_size"] + 1)
    with pytest.raises(ValueError, match=r"saved with stage 2 on \d ranks; this optimizer is stage 2 on"):
        opt.load_state_dict(mismatched)
    return True


def test_sharded_state_round_trip_and_world_size_mismatch():
    assert all(run_ranks(state_round_trip, 2))


def bad_input() -> None:
    comm = zero_comm.init_distributed()
    with pytest.raises(ValueError, match="did you mean 'weight_decay'"):
        ZeroOptimizer([{"params": [nn.Parameter(torch.zeros(3))], "weight_decy": 0.1}], AdamW(), comm=comm)
    with pytest.raises(ValueError, match="has no hyper-parameter 'momentum'"):
        ZeroOptimizer([{"params": [nn.Parameter(torch.zeros(3))], "momentum": 0.9}], Lion(), comm=comm)
    meta = nn.Parameter(torch.zeros(3, device="meta"))
    with pytest.raises(ValueError, match="mixed devices"):
        ZeroOptimizer([nn.Parameter(torch.zeros(3)), meta], AdamW(), comm=comm)
    with pytest.raises(ValueError, match="no parameters that require grad"):
        ZeroOptimizer([nn.Parameter(torch.zeros(3), requires_grad=False)], AdamW(), comm=comm)
    with pytest.raises(ValueError, match="stage must be 0, 1, 2 or 3"):
        ZeroConfig(stage=4)
    with pytest.raises(ValueError, match="precision must be one of"):
        ZeroConfig(precision="fp8")


def test_bad_input_is_named():
    run_ranks(bad_input, 1)


def sharded_view(stage: int) -> dict:
    comm = zero_comm.init_distributed()
    model = zero_models.make_model("mlp")
    names = {p: n for n, p in model.named_parameters()}
    opt = ZeroOptimizer(model.parameters(), AdamW(lr=1e-2), comm=comm, names=names,
                        config=ZeroConfig(stage=stage, bucket_numel=1500, align=8))
    x, y = zero_models.batch("mlp", 0, 8)
    opt.backward(model(x, y))
    opt.step()
    view = opt.sharded_state()
    return {"pieces": {k: [(p.start, p.stop, p.data.clone()) for p in v.pieces] for k, v in view.items()},
            "shapes": {k: v.global_shape for k, v in view.items()},
            "weights": {n: p.detach().clone() for n, p in model.named_parameters()}}


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("world_size", [2, 4])
def test_sharded_view_covers_every_tensor_exactly_once(stage, world_size):
    ranks = run_ranks(sharded_view, world_size, stage)
    weights = ranks[0]["weights"]
    for name, w in weights.items():
        for state in ("master", "exp_avg", "exp_avg_sq"):
            key = f"{state}/{name}"
            flat = torch.full((w.numel(),), float("nan"))
            covered = torch.zeros(w.numel(), dtype=torch.int64)
            for r in ranks:
                assert r["shapes"].get(key, w.shape) == w.shape
                for start, stop, data in r["pieces"].get(key, []):
                    flat[start:stop] = data
                    covered[start:stop] += 1
            assert covered.eq(1).all(), f"{key}: every element on exactly one rank"
            if state == "master":  # fp32 training: the master copy is the model's weight
                assert torch.equal(flat.view(w.shape), w), key


def misuse() -> None:
    comm = zero_comm.init_distributed()
    p = [nn.Parameter(torch.zeros(3))]
    for bad, message in [({"lr": -1.0}, r"lr=-1.0 must be a finite number >= 0"),
                         ({"betas": (1.5, 0.9)}, r"betas=\(1.5, 0.9\) must be a pair"),
                         ({"betas": 0.9}, r"betas=0.9 must be a pair"),
                         ({"lr": "1e-3"}, r"lr='1e-3' must be a finite number")]:
        with pytest.raises(ValueError, match=message):
            ZeroOptimizer([{"params": p, **bad}], AdamW(), comm=comm)
    with pytest.raises(ValueError, match="has no 'params' entry"):
        ZeroOptimizer([{"weight_decay": 0.0}], AdamW(), comm=comm)
    with pytest.raises(TypeError, match=r"AdamW\(lr=...\), not the class"):
        ZeroOptimizer(p, AdamW, comm=comm)
    with pytest.raises(TypeError, match="comm must be a zero_comm Communicator"):
        ZeroOptimizer(p, AdamW(), comm=None)
    for kwargs, message in [(dict(stage="2"), r"stage must be an integer, got '2'"),
                            (dict(accumulation_steps=2.5), "accumulation_steps must be an integer, got 2.5"),
                            (dict(clip_grad_norm=float("nan")), "clip_grad_norm must be a finite positive"),
                            (dict(loss_scale={"initial_scale_powr": 8}), "initial_scale_powr")]:
        with pytest.raises((ValueError, TypeError), match=message):
            ZeroConfig(**kwargs)
    assert ZeroConfig(loss_scale={"initial_scale_power": 8}).loss_scale.initial_scale_power == 8
    # named_parameters() works and names the sharded view
    model = nn.Linear(4, 2)
    opt = ZeroOptimizer(model.named_parameters(), AdamW(), comm=comm, config=ZeroConfig(stage=1))
    assert {k.split("/")[1] for k in opt.sharded_state()} <= {"weight", "bias"}
    # a model moved or cast after the optimizer was built is detached: refused at step
    model.double()
    model(torch.randn(1, 4, dtype=torch.float64)).sum().backward()
    with pytest.raises(RuntimeError, match=r"moved or cast .* after the ZeroOptimizer was built"):
        opt.step()
    # state of another model, or of another rule, is refused by name
    a = ZeroOptimizer(nn.Linear(4, 2).parameters(), AdamW(), comm=comm, config=ZeroConfig(stage=1))
    b = ZeroOptimizer(nn.Linear(5, 2).parameters(), AdamW(), comm=comm, config=ZeroConfig(stage=1))
    with pytest.raises(ValueError, match="saved for parameters of shapes"):
        b.load_state_dict(a.state_dict())
    c = ZeroOptimizer(nn.Linear(4, 2).parameters(), SGD(), comm=comm, config=ZeroConfig(stage=1))
    with pytest.raises(ValueError, match="saved by AdamW; this optimizer runs SGD"):
        c.load_state_dict(a.state_dict())


def test_misuse_gets_named_errors():
    run_ranks(misuse, 2)


def lamb_reference() -> list[float]:
    """LAMB written out per parameter in plain torch, one process, the whole batch."""
    model = zero_models.make_model("gpt")
    params = list(model.parameters())
    state = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    lr, (b1, b2), eps, wd = 2e-3, (0.9, 0.999), 1e-6, 0.01
    losses = []
    for step in range(1, 9):
        x, y = zero_models.batch("gpt", step, 8)
        loss = model(x, y)
        loss.backward()
        with torch.no_grad():
            for p, (m, v) in zip(params, state):
                m.lerp_(p.grad, 1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                u = (m / (1 - b1**step)) / ((v / (1 - b2**step)).sqrt() + eps) + wd * p
                w_norm, u_norm = p.norm(), u.norm()
                trust = (w_norm / u_norm).clamp(0.01, 10.0) if w_norm > 0 and u_norm > 0 else 1.0
                p.sub_(lr * trust * u)
                p.grad = None
        losses.append(loss.item())
    return losses


def lamb_zero(stage: int) -> list[float]:
    comm = zero_comm.init_distributed()
    model = zero_models.make_model("gpt")
    opt = ZeroOptimizer(model.parameters(), LAMB(lr=2e-3), comm=comm,
                        config=ZeroConfig(stage=stage, bucket_numel=30_000, align=8))
    per = 8 // comm.world_size
    losses = []
    for step in range(1, 9):
        x, y = zero_models.batch("gpt", step, 8)
        loss = model(x[comm.rank * per:(comm.rank + 1) * per], y[comm.rank * per:(comm.rank + 1) * per])
        opt.backward(loss)
        assert opt.step()
        losses.append(comm.all_reduce(loss.detach(), "avg").item())
    return losses


@pytest.mark.parametrize("world_size, stage", [(1, 0), (2, 1), (2, 2), (4, 2)])
def test_lamb_trust_ratios_use_whole_parameter_norms_across_shards(world_size, stage):
    """Parameters split across ranks (small buckets) still get the trust ratio of the whole tensor."""
    want = run_ranks(lamb_reference, 1)[0]
    got = run_ranks(lamb_zero, world_size, stage)[0]
    assert max(abs(a - b) / abs(b) for a, b in zip(got, want)) <= 1e-5, (got, want)
