"""PipelineModule: how layers are cut into stages and what each stage builds (no processes)."""

import pytest
import tiny_gpt
import torch
from torch import nn

from zero_pipe import LayerSpec, PipelineModule, layer_weights, partition_balanced

BUILT: list[int] = []


class Counted(nn.Linear):
    def __init__(self, index: int, width: int = 4):
        super().__init__(width, width)
        BUILT.append(index)


def test_partition_balances_the_largest_part() -> None:
    assert partition_balanced([1, 1, 1, 1], 2) == [0, 2, 4]
    assert partition_balanced([5, 1, 1, 1, 1, 1], 2) == [0, 1, 6]
    assert partition_balanced([2, 2, 2, 6], 2) == [0, 3, 4]
    assert partition_balanced([0, 5, 0, 5, 0], 2) in ([0, 2, 5], [0, 3, 5])


def test_layer_specs_are_built_only_on_their_stage() -> None:
    BUILT.clear()
    specs = [LayerSpec(Counted, i) for i in range(6)]
    module = PipelineModule(specs, 3, stage_id=1, partition_method="uniform")
    assert [i for i in BUILT if i >= 0] == [2, 3]
    assert sorted(module.state_dict()) == ["layers.2.bias", "layers.2.weight", "layers.3.bias", "layers.3.weight"]
    assert module.describe_stage() == "stage 1 (layers 2-3)"


def test_partition_methods_weigh_layers_differently() -> None:
    layers = tiny_gpt.layers(3)  # embed(tied), 3 blocks, norm, head(tied)
    assert layer_weights(layers, "uniform") == [1.0] * 6
    assert layer_weights(layers, "type:block") == [0, 1, 1, 1, 0, 0]
    params = layer_weights(layers, "parameters")
    assert params[0] == params[-1] == (tiny_gpt.VOCAB + tiny_gpt.BLOCK) * tiny_gpt.EMBD
    assert params[4] == 2 * tiny_gpt.EMBD
    with pytest.raises(ValueError, match="unknown partition_method 'size'"):
        layer_weights(layers, "size")


def test_interleaved_chunks_take_every_pth_part() -> None:
    module = PipelineModule(tiny_gpt.layers(5), 2, stage_id=1, partition_method="uniform", chunks=2)
    assert [list(module.chunk_range(c)) for c in range(2)] == [[2, 3], [6, 7]]
    assert module.tie_holders == {"embed": [0, 1]}
    with pytest.raises(RuntimeError, match="holds 2 model chunks"):
        module(torch.zeros(1, 8, tiny_gpt.EMBD))


def test_seeded_layers_do_not_depend_on_the_cut() -> None:
    one = PipelineModule(tiny_gpt.layers(2), 1, stage_id=0, seed=7).state_dict()
    two = PipelineModule(tiny_gpt.layers(2), 2, stage_id=1, seed=7, partition_method="uniform").state_dict()
    for name, value in two.items():
        torch.testing.assert_close(value, one[name], rtol=0, atol=0)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="stage_id 2 is outside a pipeline of 2 stages"):
        PipelineModule(tiny_gpt.layers(2), 2, stage_id=2)
    with pytest.raises(TypeError, match="layer 1 is a int"):
        PipelineModule([nn.Linear(2, 2), 3], 1, stage_id=0)
    with pytest.raises(TypeError, match=r"needs an nn\.Module class"):
        LayerSpec(print)
