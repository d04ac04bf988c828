"""What Hugging Face's Trainer and Accelerate call on ``deepspeed.*`` and on the engine, without either
installed: the config read as a dict, a loss the caller already divided (``scale_wrt_gas=False``), the
overflow flag, ``fp16.auto_cast``, node-local checkpoint storage, the stage-3 whole-weights export, and
``checkpoint.utils.clone_tensors_for_torch_save``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zero_all as deepspeed
from zero_all._engine._checkpoints import check_node_local_storage
from zero_comm.testing import run_ranks


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
        self.seen: list[torch.dtype] = []

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.dtype)
        return F.cross_entropy(self.net(x).float(), y)


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
    return x, x[:, :4].argmax(1)


def config(stage: int, accum: int = 1, **extra: object) -> dict:
    return {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": accum,
            "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "zero_optimization": {"stage": stage}, **extra}


def trained(stage: int, caller_divides: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    engine, *_ = deepspeed.initialize(model=Net(), config=config(stage, accum=2))
    for step in range(4):
        loss = engine(*data(step))
        if caller_divides:  # the Trainer: loss / accumulation, then backward(..., scale_wrt_gas=False)
            engine.backward(loss / 2, scale_wrt_gas=False)
        else:
            engine.backward(loss)
        engine.step()
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        return {k: v.clone() for k, v in engine.module.state_dict().items()}


def divided_by_the_caller(stage: int) -> bool:
    plain, divided = trained(stage, False), trained(stage, True)
    return all(torch.equal(plain[k], divided[k]) for k in plain)


@pytest.mark.parametrize("stage", [1, 3])
def test_a_loss_the_caller_divided_trains_as_the_engines_own_division(stage: int):
    assert run_ranks(divided_by_the_caller, 1, stage) == [True]


def read_as_dict_and_overflow() -> dict:
    torch.manual_seed(0)
    engine, *_ = deepspeed.initialize(model=Net(), config=config(2, fp16={"enabled": True, "auto_cast": True}))
    seen = {"stage": engine.config.get("zero_optimization", {}).get("stage"), "has_fp16": "fp16" in engine.config,
            "micro": engine.config["train_micro_batch_size_per_gpu"]}
    x, y = data(0)
    engine.backward(engine(x, y) * float("inf"))
    engine.step()
    seen["overflow_after_inf"] = engine.optimizer.overflow
    engine.backward(engine(x, y))
    engine.step()
    seen["overflow_after_finite"] = engine.optimizer.overflow
    seen["inputs"] = [str(d) for d in engine.module.seen]  # auto_cast: the forward got fp16 inputs
    return seen


def test_the_config_reads_as_a_dict_overflow_is_reported_and_auto_cast_casts_inputs():
    got = run_ranks(read_as_dict_and_overflow, 1)[0]
    assert (got["stage"], got["has_fp16"], got["micro"]) == (2, True, 4)
    assert (got["overflow_after_inf"], got["overflow_after_finite"]) == (True, False)
    assert got["inputs"] == ["torch.float16", "torch.float16"]


def stage3_export() -> tuple[bool, int, bool]:
    torch.manual_seed(0)
    want = {k: v.clone() for k, v in Net().state_dict().items()}
    torch.manual_seed(0)
    engine, *_ = deepspeed.initialize(model=Net(), config=config(
        3, zero_optimization={"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}))
    state = engine._zero3_consolidated_16bit_state_dict()  # every rank gathers; rank 0 gets the weights
    equal = state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)
    return engine.zero_gather_16bit_weights_on_model_save(), len(state), equal


def test_stage3_gives_the_whole_weights_the_way_hugging_face_asks():
    assert run_ranks(stage3_export, 2) == [(True, 4, True), (True, 0, False)]


def test_node_local_storage_is_accepted_on_one_node_and_refused_across_nodes(monkeypatch: pytest.MonkeyPatch):
    local = deepspeed.load_config({"train_batch_size": 4, "checkpoint": {"use_node_local_storage": True}})
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    check_node_local_storage(local)  # one node: every rank already shares the storage
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(deepspeed.ConfigError, match=r"checkpoint.use_node_local_storage: .* spans 2 nodes"):
        check_node_local_storage(local)


def test_clone_tensors_for_torch_save_copies_views_alone():
    whole = torch.arange(1000.0)
    cloned = deepspeed.checkpoint.utils.clone_tensors_for_torch_save({"a": [whole[:3]], "b": (whole[5:7], 1)})
    assert torch.equal(cloned["a"][0], whole[:3]) and cloned["b"][1] == 1
    assert cloned["a"][0].untyped_storage().nbytes() == 3 * 4  # not the 1000-element storage behind the view
