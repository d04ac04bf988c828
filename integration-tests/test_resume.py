"""Resuming from a checkpoint equals never stopping, across world sizes and ZeRO stages.

Ten steps straight, against five steps, a save (zero-ckpt, from the optimizer's sharded
state), fresh processes that load it -- on another number of ranks, or another stage --
and five more. Same world size and stage: identical fp32 weights. Otherwise the losses
agree to fp32 rounding (data parallelism on another number of ranks sums in another
order). A model saved by ZeRO loads into a plain nn.Module, and exports to one file.
"""

import sys
from pathlib import Path

import pytest
import torch

import zero_ckpt
import zero_comm
from zero_comm.testing import run_ranks
from zero_optim import AdamW, ZeroConfig, ZeroOptimizer, ZeroStage3

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import gpt

BATCH, LR = 8, 3e-3
CFG = gpt.GPTConfig()


def build(stage: int, comm: zero_comm.Communicator):
    torch.manual_seed(0)
    model = gpt.GPT(CFG)
    rule = AdamW(lr=LR, weight_decay=0.01)
    if stage == 3:
        return model, ZeroStage3(model, rule, comm=comm, config=ZeroConfig(stage=3, persistence_threshold=1000))
    return model, ZeroOptimizer(model.named_parameters(), rule, comm=comm,
                                config=ZeroConfig(stage=stage, bucket_numel=20_000))


def train(model, opt, comm, steps: range) -> list[float]:
    per_rank = BATCH // comm.world_size
    losses = []
    for step in steps:
        x, y = gpt.global_batch(step, BATCH, CFG)
        mine = slice(comm.rank * per_rank, (comm.rank + 1) * per_rank)
        loss = model(x[mine], y[mine])
        opt.backward(loss)
        opt.step()
        losses.append(comm.all_reduce(loss.detach(), "avg").item())
    return losses


def masters(model, opt) -> dict[str, torch.Tensor]:
    """The fp32 master weights, whole, on every rank (a rank lists only the tensors it holds part of)."""
    state = opt.sharded_state()
    full = {}
    for name, param in model.named_parameters():
        flat = torch.zeros(param.numel())
        entry = state.get(f"master/{name}")
        for p in entry.pieces if entry is not None else []:
            flat[p.start:p.stop] = p.data
        full[name] = opt.comm.all_reduce(flat) if opt.sharded else flat
    return full


def straight(stage: int) -> dict:
    comm = zero_comm.init_distributed()
    model, opt = build(stage, comm)
    return {"losses": train(model, opt, comm, range(10)), "weights": masters(model, opt)}


def first_half(root: str, stage: int, async_save: bool = False) -> None:
    comm = zero_comm.init_distributed()
    model, opt = build(stage, comm)
    train(model, opt, comm, range(5))
    manager = zero_ckpt.CheckpointManager(root, comm)
    manager.save("step5", {"optim": opt}, client_state={"next_step": 5}, async_save=async_save)
    if async_save:  # training goes on at once; the checkpoint must still hold step 5's state
        train(model, opt, comm, range(5, 7))
        manager.wait()


def second_half(root: str, stage: int) -> dict:
    comm = zero_comm.init_distributed()
    model, opt = build(stage, comm)
    client = zero_ckpt.CheckpointManager(root, comm).load({"optim": opt})
    losses = train(model, opt, comm, range(client["next_step"], 10))
    return {"losses": losses, "weights": masters(model, opt), "step": opt.step_count}


@pytest.mark.parametrize("saved, loaded, async_save", [
    ((2, 2), (2, 2), False), ((2, 2), (2, 2), True), ((2, 2), (2, 4), False), ((3, 4), (3, 1), True),
    ((1, 2), (3, 2), False), ((3, 2), (2, 2), False), ((2, 2), (0, 2), False)])
def test_resume_equals_uninterrupted(tmp_path, saved, loaded, async_save):
    (s_stage, s_world), (l_stage, l_world) = saved, loaded
    want = run_ranks(straight, s_world, s_stage)[0]
    run_ranks(first_half, s_world, str(tmp_path), s_stage, async_save)
    got = run_ranks(second_half, l_world, str(tmp_path), l_stage)[0]
    assert got["step"] == 10
    if saved == loaded:
        assert got["losses"] == want["losses"][5:]
        assert all(torch.equal(got["weights"][k], w) for k, w in want["weights"].items()), "identical weights"
    else:
        err = max(abs(a - b) / abs(b) for a, b in zip(got["losses"], want["losses"][5:], strict=True))
        assert err <= 1e-5, f"stage {s_stage} x{s_world} -> stage {l_stage} x{l_world}: {err:.2e}"


def test_a_zero_checkpoint_loads_into_a_plain_module_and_exports(tmp_path):
    run_ranks(first_half, 2, str(tmp_path), 3)
    weights = zero_ckpt.consolidate(tmp_path)  # no process group, any world size
    model = gpt.GPT(CFG)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"head.weight"}, "only the tied head, which shares tok.weight"
    exported = torch.load(zero_ckpt.export(tmp_path, tmp_path / "model.pt"))
    assert all(torch.equal(exported[k], v) for k, v in weights.items())
