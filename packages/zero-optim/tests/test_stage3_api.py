"""Stage 3 as a user meets it: partitioned parameters refuse to be read and say how to gather them;
gathered() reads and changes them (the optimizer follows the change); parameter groups, state
dicts and the checkpoint view work as in stages 0-2; bad arguments are named."""

import itertools

import pytest
import torch
import zero_models
from parity import BATCH, LR, WD, max_rel, rel
from torch import nn

import zero_comm
from zero_comm.testing import run_ranks
from zero_optim import (
    AdamW,
    PartitionedParameter,
    PartitionedParameterError,
    ZeroConfig,
    ZeroOptimizer,
    ZeroStage3,
    gathered,
)

STAGE3 = ZeroConfig(stage=3, persistence_threshold=0)


def read_and_change() -> bool:
    comm = zero_comm.init_distributed()
    model = zero_models.make_model("mlp")
    want = {k: v.clone() for k, v in model.state_dict().items()}
    opt = ZeroStage3(model, AdamW(lr=LR), comm=comm, config=STAGE3)
    w = model.net[0].weight
    assert isinstance(w, PartitionedParameter) and w.shape == (64, 32), "the full shape stays visible"
    assert "partitioned" in repr(w)
    for read in (w.sum, w.detach, lambda: w + 1, lambda: torch.cat([w, w])):
        with pytest.raises(PartitionedParameterError, match=r"'net\.0\.weight'.*zero_optim\.gathered"):
            read()
    # state_dict() lists a partitioned model's keys and shapes (what Hugging Face's from_pretrained needs) with
    # meta tensors where the values would be: never mistaken for, or saved as, the weights
    placeholders = model.state_dict()
    assert placeholders.keys() == want.keys()
    assert all(v.is_meta and v.shape == want[k].shape and v.dtype == want[k].dtype for k, v in placeholders.items())
    with gathered(model.parameters()):
        assert all(torch.equal(p, want[n]) for n, p in model.named_parameters()), "gathered reads the weights"
    with pytest.raises(PartitionedParameterError):
        w.sum()  # released again on exit
    with gathered(w):  # no modifier: a change is dropped
        w.data.fill_(3.0)
    assert torch.equal(opt.consolidated_state_dict(rank0_only=False)["net.0.weight"], want["net.0.weight"])
    with gathered(w, modifier_rank=0):  # rank 0's change is kept, whatever the others did
        w.data.fill_(0.5 if comm.rank == 0 else -1.0)
    full = opt.consolidated_state_dict(rank0_only=False)
    assert torch.equal(full["net.0.weight"], torch.full((64, 32), 0.5))
    master = opt.sharded_state().get("master/net.0.weight")  # absent where no element of it is this rank's
    assert master is not None or comm.rank > 0, "rank 0 owns the start of every unit"
    assert all(torch.equal(piece.data, torch.full_like(piece.data, 0.5))
               for piece in (master.pieces if master else [])), "the master weights follow"
    return True


def test_partitioned_parameters_are_read_and_changed_through_gathered():
    assert all(run_ranks(read_and_change, 2))


def groups_and_state() -> dict:
    comm = zero_comm.init_distributed()
    model = zero_models.make_model("gpt")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = ZeroStage3(model, AdamW(lr=LR, weight_decay=WD), comm=comm, config=STAGE3,
                     param_groups=[{"params": decay}, {"params": rest, "weight_decay": 0.0}])
    per_rank = BATCH // comm.world_size
    losses, saved = [], None
    for step in range(6):
        if step == 4:
            saved = (opt.state_dict(), opt.consolidated_state_dict(rank0_only=False))
        x, y = zero_models.batch("gpt", step, BATCH)
        loss = model(x[comm.rank * per_rank:(comm.rank + 1) * per_rank],
                     y[comm.rank * per_rank:(comm.rank + 1) * per_rank])
        opt.backward(loss)
        opt.step()
        losses.append(comm.all_reduce(loss.detach(), "avg").item())
    state, weights = saved
    opt.load_state_dict(state)
    restored = opt.consolidated_state_dict(rank0_only=False)
    sharded = opt.sharded_state()
    covered = {name: sorted((p.start, p.stop) for p in t.pieces) for name, t in sharded.items()}
    return {"losses": losses, "restored": all(torch.equal(restored[k], v) for k, v in weights.items()),
            "step": opt.step_count, "covered": covered, "shapes": {n: t.global_shape for n, t in sharded.items()}}


def grouped_reference() -> list[float]:
    model = zero_models.make_model("gpt")
    opt = torch.optim.AdamW([{"params": [p for p in model.parameters() if p.dim() >= 2]},
                             {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                            lr=LR, weight_decay=WD)
    losses = []
    for step in range(6):
        loss = model(*zero_models.batch("gpt", step, BATCH))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_parameter_groups_state_dict_and_checkpoint_view():
    want = run_ranks(grouped_reference, 1)[0]
    results = run_ranks(groups_and_state, 2)
    for r in results:
        assert max_rel(r["losses"], want) <= 1e-5, "per-group weight decay matches torch's groups"
        assert r["restored"] and r["step"] == 4, "load_state_dict puts back the weights and the step"
    for name, shape in results[0]["shapes"].items():  # the two ranks' pieces tile every tensor exactly once
        pieces = sorted(results[0]["covered"].get(name, []) + results[1]["covered"].get(name, []))
        assert pieces[0][0] == 0 and pieces[-1][1] == torch.Size(shape).numel(), name
        assert all(a[1] == b[0] for a, b in itertools.pairwise(pieces)), name


def bad_input() -> None:
    comm = zero_comm.init_distributed()
    model = zero_models.make_model("mlp")
    with pytest.raises(TypeError, match="pass the model"):
        ZeroStage3(model.parameters(), AdamW(), comm=comm)
    with pytest.raises(ValueError, match=r"ZeroConfig\(stage=3"):
        ZeroStage3(model, AdamW(), comm=comm, config=ZeroConfig(stage=2))
    with pytest.raises(ValueError, match="ZeroStage3"):
        ZeroOptimizer(model.parameters(), AdamW(), comm=comm, config=ZeroConfig(stage=3))
    with pytest.raises(ValueError, match="not in the module"):
        ZeroStage3(model, AdamW(), comm=comm, param_groups=[{"params": [nn.Parameter(torch.zeros(2))]}])
    with pytest.raises(ValueError, match="did you mean 'weight_decay'"):
        ZeroStage3(model, AdamW(), comm=comm, param_groups=[{"params": [], "weight_decy": 0.0}])
    with pytest.raises(ValueError, match="prefetch_numel must be >= 0"):
        ZeroConfig(stage=3, prefetch_numel=-1)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters that require grad"):
        ZeroStage3(frozen, AdamW(), comm=comm)


def test_bad_input_is_named():
    run_ranks(bad_input, 1)


def frozen_part() -> float:
    comm = zero_comm.init_distributed()
    model = zero_models.make_model("mlp")
    model.net[0].requires_grad_(False)
    first = model.net[0].weight.detach().clone()
    opt = ZeroStage3(model, AdamW(lr=LR, weight_decay=WD), comm=comm, config=STAGE3)
    for step in range(3):
        x, y = zero_models.batch("mlp", step, BATCH)
        opt.backward(model(x, y))
        opt.step()
    weights = opt.consolidated_state_dict()  # every rank gathers; rank 0 gets the weights
    return rel(weights["net.0.weight"], first) if comm.rank == 0 else 0.0


def test_frozen_parameters_are_gathered_but_never_stepped():
    assert run_ranks(frozen_part, 2)[0] == 0.0


class TiedInParent(nn.Module):
    """The parent holds no parameters and reads its child's weight itself (a tied output head)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.mix = nn.Embedding(16, 8), nn.Linear(8, 8)
        self.gain = nn.Parameter(torch.ones(1))  # small: the persistent unit; rank 1's share is empty

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits = torch.tanh(self.mix(self.emb(idx))) @ self.emb.weight.t() * self.gain
        return nn.functional.cross_entropy(logits.view(-1, 16), idx.roll(1, 1).view(-1))


def edges(plain_backward: bool) -> list[float]:
    comm = zero_comm.init_distributed()
    model = TiedInParent()
    opt = ZeroStage3(model, AdamW(lr=1e-2), comm=comm,
                     config=ZeroConfig(stage=3, persistence_threshold=1, accumulation_steps=2))
    with pytest.raises(ValueError, match="already run by a ZeroStage3"):
        ZeroStage3(model, AdamW(), comm=comm)
    with pytest.raises(RuntimeError, match="indices"):
        model(torch.zeros(2, 3))  # a forward that raises inside a module (float indices)
    with pytest.raises(PartitionedParameterError):
        model.mix.weight.sum()  # nothing left gathered or running after the exception
    losses = []
    for step in range(4):
        idx = torch.randint(0, 16, (4, 6), generator=torch.Generator().manual_seed(step))
        for micro in idx.chunk(2):
            loss = model(micro)
            if plain_backward:
                (loss / 2).backward()  # without opt.backward: the next forward or step reduces it
            else:
                opt.backward(loss)
            losses.append(comm.all_reduce(loss.detach(), "avg").item())
        opt.step()
    return losses


def test_tied_weight_in_parent_empty_persistent_share_errors_and_plain_backward():
    with_opt = run_ranks(edges, 2, False)
    plain = run_ranks(edges, 2, True)
    assert with_opt[0] == with_opt[1]
    assert max_rel(plain[0], with_opt[0]) <= 1e-6, "loss.backward() with accumulation loses nothing"


def callers(event) -> str:
    names = []
    while (event := event.cpu_parent) is not None:
        names.append(event.name)
    return " < ".join(names)


def build_under_profilers() -> dict:
    """``partitioned`` observes each module's __init__ through the interpreter's profile hook; a
    profiler the user runs must keep working around it, whichever kind it is."""
    import cProfile
    import sys

    from torch.profiler import ProfilerActivity, profile

    from zero_optim import partitioned

    comm = zero_comm.init_distributed()
    out: dict = {}
    # torch's profiler with Python stacks installs its hook from C: partitioned falls back to the
    # trace hook and leaves the profiler's in place
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        hook = sys.getprofile()
        with partitioned(comm):
            model = zero_models.make_model("mlp")
        out["torch_hook_kept"] = sys.getprofile() is hook
        torch.ones(3).mul(2)  # after the block, still profiled with its Python caller
    out["torch_partitioned"] = all(isinstance(p, PartitionedParameter) for p in model.parameters())
    out["torch_stack_after"] = any(e.name == "aten::mul" and "build_under_profilers" in callers(e)
                                   for e in prof.events())
    # a Python profile function sees every event it would have seen, and is put back
    seen: list[str] = []

    def mine(frame, event, arg):
        if event == "call" and frame.f_code.co_name == "__init__":
            seen.append(frame.f_code.co_name)

    sys.setprofile(mine)
    try:
        with partitioned(comm):
            model = zero_models.make_model("mlp")
        out["python_hook_kept"] = sys.getprofile() is mine
    finally:
        sys.setprofile(None)
    out["python_partitioned"] = all(isinstance(p, PartitionedParameter) for p in model.parameters())
    out["python_saw_inits"] = len(seen) > 0
    # both hooks taken (cProfile from C, and a tracer): a clear error, the model never half-built
    cprof = cProfile.Profile()
    sys.settrace(lambda *a: None)
    cprof.enable()
    try:
        with (pytest.raises(RuntimeError, match=r"sys\.setprofile or sys\.settrace.*both are taken"),
              partitioned(comm)):
            zero_models.make_model("mlp")
    finally:
        cprof.disable()
        sys.settrace(None)
    return out


@pytest.mark.parametrize("world_size", [1, 2])
def test_partitioned_construction_runs_under_the_users_profilers(world_size):
    for r in run_ranks(build_under_profilers, world_size):
        assert r == {"torch_hook_kept": True, "torch_partitioned": True, "torch_stack_after": True,
                     "python_hook_kept": True, "python_partitioned": True, "python_saw_inits": True}


def modify_in_bf16() -> dict:
    comm = zero_comm.init_distributed()
    model = zero_models.make_model("mlp")
    opt = ZeroStage3(model, AdamW(lr=LR), comm=comm, config=ZeroConfig(stage=3, precision="bf16",
                                                                       persistence_threshold=0))
    opt.backward(model(*zero_models.batch("mlp", comm.rank, 4)))
    opt.step()  # the fp32 masters now hold more than their bf16 rounding

    def masters() -> dict[str, torch.Tensor]:
        return {k: torch.cat([p.data.reshape(-1).clone() for p in v.pieces]) if v.pieces else torch.zeros(0)
                for k, v in opt.sharded_state().items() if k.startswith("master/net.0.")}

    before = masters()
    w = model.net[0].weight
    with gathered(model.net[0].parameters(), modifier_rank=0):  # one unit: the weight and its bias
        w.data.mul_(2)
    after = masters()
    bias = [k for k in before if k.endswith("bias")]  # (a rank may hold no piece of one)
    return {"bias_kept": all(torch.equal(before[k], after[k]) for k in bias),
            "weight_taken": all(torch.equal(after[k], before[k].bfloat16().float() * 2)
                                for k in before if k.endswith("weight")),
            "had_more": any(not torch.equal(before[k], before[k].bfloat16().float()) for k in bias)}


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_change_under_gathered_leaves_the_other_masters_of_its_unit_exact(world_size):
    """bf16: the master weights take what the block changed, and keep their fp32 value for what it did
    not (they are not replaced by their bf16 rounding: a resumed checkpoint continues exactly)."""
    results = run_ranks(modify_in_bf16, world_size)
    assert all(r["bias_kept"] and r["weight_taken"] for r in results), results
    assert any(r["had_more"] for r in results), "the test needs masters finer than bf16"
