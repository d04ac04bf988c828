"""How stage 3 cuts a model into gather units (``zero_optim.unit_parameters``), which the sharder and
``zero plan`` both follow: whole blocks up to ``unit_numel``, never a container that is not called."""

from __future__ import annotations

import sys

import pytest
import zero_models
from torch import nn

from zero_optim import ZeroConfig, granularity, unit_parameters


def heads(model: nn.Module, unit_numel: int, granularity_threshold: int = 0) -> list[list[str]]:
    return [[name for name, _ in unit] for unit in unit_parameters(model, unit_numel, granularity_threshold)]


def test_blocks_up_to_the_limit_are_one_unit_each_and_never_the_list_that_holds_them():
    model = zero_models.GPT(layers=3)  # 0.6M parameters: the three blocks together fit the default too
    units = heads(model, ZeroConfig().unit_numel)
    blocks = [u for u in units if u[0].startswith("blocks.")]
    assert [sorted({n.split(".")[1] for n in u}) for u in blocks] == [["0"], ["1"], ["2"]], units
    first = [n for n, _ in model.blocks[0].named_parameters(prefix="blocks.0")]
    assert blocks[0] == first, "a block's unit holds every parameter of its subtree, in order"
    assert units[0] == ["tok.weight"] and units[1] == ["pos.weight"]


def test_a_subtree_above_the_limit_is_cut_into_its_children():
    model = zero_models.GPT(layers=2, d=128)
    block = sum(p.numel() for p in model.blocks[0].parameters())
    units = heads(model, block - 1)  # a block no longer fits: its Linears (and the mlp Sequential) do
    assert ["blocks.0.qkv.weight"] in units and ["blocks.0.proj.weight", "blocks.0.proj.bias"] in units
    assert ["blocks.0.mlp.0.weight", "blocks.0.mlp.0.bias", "blocks.0.mlp.2.weight", "blocks.0.mlp.2.bias"] in units


@pytest.mark.parametrize("unit_numel", [0, 1, 10**9])
def test_every_parameter_is_in_exactly_one_unit_a_tied_weight_with_its_first_module(unit_numel: int):
    model = zero_models.GPT(layers=2)
    units = heads(model, unit_numel)
    flat = [n for u in units for n in u]
    assert sorted(flat) == sorted(n for n, _ in model.named_parameters()), units
    assert "head.weight" not in flat  # the same tensor as tok.weight: gathered with the embedding


def test_zero_gathers_each_modules_own_parameters_alone_as_deepspeed_does():
    model = zero_models.GPT(layers=2)
    want = [[n for n, _ in m.named_parameters(prefix=p, recurse=False)] for p, m in model.named_modules()]
    assert heads(model, 0) == [u for u in want if u and u != ["head.weight"]]


def test_the_model_itself_is_never_one_unit():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    assert heads(model, 10**9) == [["0.weight", "0.bias"], ["1.weight", "1.bias"]]


class Act(nn.Module):
    """Children but no parameters: not a layer."""

    def __init__(self) -> None:
        super().__init__()
        self.gelu, self.drop = nn.GELU(), nn.Dropout(0.0)

    def forward(self, x):
        return self.drop(self.gelu(x))


class Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.act, self.b = nn.Linear(4, 4), Act(), nn.Linear(4, 4)

    def forward(self, x):
        return self.b(self.act(self.a(x)))


class Net(nn.Module):
    """Pair: 40 elements over 3 layers (two Linears and itself; Act holds no parameter): granularity 13.
    Net: 580 elements over 8 layers (six in the pairs -- the ModuleList adds none --, the head,
    itself): granularity 72."""

    def __init__(self) -> None:
        super().__init__()
        self.pairs = nn.ModuleList([Pair(), Pair()])
        self.head = nn.Linear(4, 100)

    def forward(self, x):
        for pair in self.pairs:
            x = pair(x)
        return self.head(x)


def test_deepspeeds_module_granularity_is_elements_per_layer_and_never_a_containers_or_a_leafs():
    model = Net()
    found = granularity(model)
    assert found[id(model.pairs[0])] == 13 and found[id(model)] == 72
    assert found[id(model.pairs)] == sys.maxsize and found[id(model.head)] == sys.maxsize
    assert found[id(model.pairs[0].act)] == sys.maxsize


A0, B0, A1, B1 = ([f"pairs.{i}.{m}.weight", f"pairs.{i}.{m}.bias"] for i in (0, 1) for m in "ab")
HEAD = ["head.weight", "head.bias"]


@pytest.mark.parametrize(("threshold", "want"), [
    (12, [A0, B0, A1, B1, HEAD]),  # below every granularity: each module's own parameters
    (13, [A0 + B0, A1 + B1, HEAD]),  # the pairs are fused, the model is not
    (72, [A0 + B0 + A1 + B1 + HEAD]),  # the model itself: DeepSpeed fuses the root too
])
def test_a_granularity_threshold_fuses_the_first_module_at_or_below_it_top_down(threshold: int, want: list):
    assert heads(Net(), 0, threshold) == want  # as DeepSpeed's stage3_module_granularity_threshold does


class MLP(nn.Sequential):
    """A subclass of a container with a forward of its own: a layer to DeepSpeed's measure."""

    def forward(self, x):
        return super().forward(x) * 2


def test_a_subclass_of_sequential_is_a_layer_and_torchs_own_containers_are_not():
    model = nn.Sequential(MLP(nn.Linear(4, 4), nn.Linear(4, 4)), nn.Linear(4, 4))
    found = granularity(model)
    assert found[id(model[0])] == 40 // 3 and found[id(model)] == sys.maxsize
    assert heads(model, 0, 13) == [["0.0.weight", "0.0.bias", "0.1.weight", "0.1.bias"], ["1.weight", "1.bias"]]
