"""A checkpoint of an offloaded optimizer resumes exactly: the state comes out of the NVMe store for
the save, goes back into it on load, and nothing cached in host memory stands in for the files (the
cache is dropped before every step). Saving needs no store buffers beyond the training budget."""

from pathlib import Path

import pytest
import torch
from test_resume import CFG, LR, gpt, masters, train

import zero_ckpt
import zero_comm
from zero_comm.testing import run_ranks
from zero_offload import NVMeStore
from zero_optim import AdamW, ZeroConfig, ZeroOptimizer, ZeroStage3


def build(stage: int, comm: zero_comm.Communicator, swap: str):
    torch.manual_seed(0)
    model = gpt.GPT(CFG)
    rule = AdamW(lr=LR, weight_decay=0.01)
    # a budget of a couple of units' state: the save must not need the whole state in buffers
    store = NVMeStore(swap, buffer_bytes=3 << 20)
    if stage == 3:
        opt = ZeroStage3(model, rule, comm=comm, store=store,
                         config=ZeroConfig(stage=3, persistence_threshold=1000, offload_param=True))
    else:
        opt = ZeroOptimizer(model.named_parameters(), rule, comm=comm, store=store,
                            config=ZeroConfig(stage=stage, bucket_numel=20_000))
    opt.register_step_pre_hook(lambda _: store.drop_cache())
    return model, opt, store


def straight(stage: int, swap: str) -> dict:
    comm = zero_comm.init_distributed()
    model, opt, store = build(stage, comm, swap)
    out = {"losses": train(model, opt, comm, range(8)), "weights": masters(model, opt)}
    store.close()
    return out


def first_half(root: str, stage: int, swap: str) -> None:
    comm = zero_comm.init_distributed()
    model, opt, store = build(stage, comm, swap)
    train(model, opt, comm, range(4))
    zero_ckpt.CheckpointManager(root, comm).save("step4", {"optim": opt}, client_state={"next_step": 4})
    store.close()


def second_half(root: str, stage: int, swap: str) -> dict:
    comm = zero_comm.init_distributed()
    model, opt, store = build(stage, comm, swap)
    client = zero_ckpt.CheckpointManager(root, comm).load({"optim": opt})
    store.drop_cache()  # the loaded state must be in the files, not only in a cached buffer
    out = {"losses": train(model, opt, comm, range(client["next_step"], 8)), "weights": masters(model, opt),
           "held": store._swap.held()}
    store.close()
    return out


@pytest.mark.parametrize("stage", [2, 3])
def test_an_offloaded_optimizer_resumes_exactly(tmp_path: Path, stage: int):
    swap = tmp_path / "swap"
    swap.mkdir()
    want = run_ranks(straight, 2, stage, str(swap))[0]
    run_ranks(first_half, 2, str(tmp_path / "ckpt"), stage, str(swap))
    got = run_ranks(second_half, 2, str(tmp_path / "ckpt"), stage, str(swap))[0]
    assert got["losses"] == want["losses"][4:]
    assert all(torch.equal(got["weights"][k], w) for k, w in want["weights"].items()), "identical weights"
    assert got["held"] == [], "nothing left borrowed from the store"
