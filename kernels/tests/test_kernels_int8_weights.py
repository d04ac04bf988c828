"""quantize_weights_: a model's weights held as int8 (one byte each plus a scale per block), computed in
their float dtype; outputs close to the float model; tied weights quantised once; nothing else touched."""

import pytest
import torch
from torch import nn

from zero_kernels import dequantize_int8, quantize_int8, quantize_weights_, weight_bytes


def model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(100, 64), nn.LayerNorm(64), nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64),
                      nn.Linear(64, 100, bias=False))
    m[5].weight = m[0].weight  # an output head tied to the embedding
    return m


def test_weights_take_a_quarter_of_the_bytes_and_outputs_stay_close(path: str):
    ref, q = model().to(path), model().to(path)
    ids = torch.randint(0, 100, (4, 9), generator=torch.Generator().manual_seed(1)).to(path)
    done = quantize_weights_(q, block_size=64)
    assert done.modules == ("0", "2", "4", "5")
    assert done.bytes_before == weight_bytes(ref)
    # int8 values plus one fp32 scale per 64: (1 + 4/64) / 4 of the matrices; LayerNorm and biases stay fp32
    assert done.ratio <= 0.3 and done.bytes_after == weight_bytes(q)
    with torch.no_grad():
        want, got = ref(ids), q(ids)
    assert ((got - want).abs().max() / want.abs().max()).item() < 0.02
    assert not any(p.dtype == torch.int8 for p in q.parameters())  # int8 values are buffers, not parameters
    assert {n for n, _ in q.named_parameters()} == {"1.weight", "1.bias", "2.bias", "4.bias"}


def test_tied_weights_are_quantised_once_and_stay_shared():
    q = model()
    quantize_weights_(q)
    assert q[5].weight_int8 is q[0].weight_int8 and q[5].weight_scale is q[0].weight_scale


def test_the_weight_is_dequantised_for_the_forward_only():
    q = model()
    quantize_weights_(q, block_size=32)
    seen = []
    q[2].register_forward_pre_hook(lambda m, a: seen.append(m.weight.clone()))  # runs after ours
    q(torch.tensor([[1, 2, 3]]))
    assert q[2].weight is None, "the float weight outlived the forward"
    expected = dequantize_int8(q[2].weight_int8.reshape(-1), q[2].weight_scale, 32).view(256, 64)
    assert torch.equal(seen[0], expected)


def test_a_module_raising_in_its_forward_does_not_keep_its_float_weight():
    q = nn.Linear(64, 64)
    quantize_weights_(q)
    with pytest.raises(RuntimeError):
        q(torch.ones(3, 5))  # the wrong width
    assert q.weight is None


def test_quantisation_matches_quantize_int8_and_include_chooses_modules():
    ref, q = model(), model()
    done = quantize_weights_(q, include=lambda name, module: isinstance(module, nn.Linear) and name != "5")
    assert done.modules == ("2", "4")
    values, scales = quantize_int8(ref[2].weight.detach(), 64)
    assert torch.equal(q[2].weight_int8.reshape(-1), values) and torch.equal(q[2].weight_scale, scales)
    assert isinstance(q[0].weight, nn.Parameter)  # not chosen: untouched
