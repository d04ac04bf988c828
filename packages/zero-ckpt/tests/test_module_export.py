"""A checkpoint that carries a ModuleState exports the module's whole state_dict: weights saved sharded
under their own prefix, buffers, a frozen weight, a tied weight and a submodule shared at two paths,
each key under the module's own name and order, loading with strict=True."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import zero_comm
from zero_ckpt import (
    CheckpointError,
    CheckpointManager,
    FullTensor,
    ModuleRecord,
    ModuleState,
    consolidate,
    module_record,
)
from zero_comm.testing import run_ranks


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.block = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6))
        self.again = self.block  # one submodule at two paths: its keys twice in the state_dict
        self.frozen = nn.Linear(6, 6).requires_grad_(False)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("steps", torch.tensor(0))
        self.register_buffer("cache", torch.zeros(2), persistent=False)


class Piece:
    def __init__(self, start: int, stop: int, data: torch.Tensor):
        self.start, self.stop, self.data = start, stop, data


def trained_net() -> Net:
    torch.manual_seed(3)
    net = Net()
    with torch.no_grad():
        for t in net.state_dict().values():
            t.copy_(torch.randint(0, 50, t.shape) if not t.is_floating_point() else torch.randn(t.shape))
    return net


def save(root: str) -> None:
    """The trained weights cut between the ranks (as a ZeRO optimizer holds them), the rest whole."""
    comm = zero_comm.init_distributed()
    net = trained_net()
    trained = {n: p for n, p in net.named_parameters() if p.requires_grad}
    weights = {}
    for name, p in trained.items():
        flat = p.detach().reshape(-1)
        chunk = -(-flat.numel() // comm.world_size)
        start, stop = min(comm.rank * chunk, flat.numel()), min((comm.rank + 1) * chunk, flat.numel())
        weights[name] = FullTensor(tuple(p.shape), p.dtype, [Piece(start, stop, flat[start:stop].clone())])
    extras = {n: b for n, b in net.named_buffers() if n in net.state_dict()}
    extras.update({n: p for n, p in net.named_parameters() if not p.requires_grad})
    record = module_record(net, weights="weights/", extras="module/",
                           frozen=[n for n, p in net.named_parameters() if not p.requires_grad])
    CheckpointManager(root, comm).save("t", {"weights": weights, "module": ModuleState(extras, record)})


def test_the_record_names_aliases_buffers_and_frozen_weights():
    net = Net()
    record = module_record(net, weights="w/", extras="m/", frozen=["frozen.weight", "frozen.bias"])
    assert record.keys == list(net.state_dict())
    assert record.tied == {"again.0.weight": "block.0.weight", "again.0.bias": "block.0.bias",
                           "again.1.weight": "block.1.weight", "again.1.bias": "block.1.bias",
                           "again.1.running_mean": "block.1.running_mean", "again.1.running_var": "block.1.running_var",
                           "again.1.num_batches_tracked": "block.1.num_batches_tracked",
                           "head.weight": "embed.weight"}
    assert set(record.buffers) == {"steps", "block.1.running_mean", "block.1.running_var",
                                   "block.1.num_batches_tracked"}, "persistent buffers only, each once"
    assert ModuleRecord.from_plain(record.to_plain(), "here") == record
    with pytest.raises(CheckpointError, match="module record version 99"):
        ModuleRecord.from_plain({**record.to_plain(), "version": 99}, "here")


def test_records_of_two_pipeline_stages_merge_in_rank_order():
    a = ModuleRecord(["x.w", "y.w"], "w/", "m/", [], [], {"y.w": "x.w"})
    b = ModuleRecord(["z.w", "z.b"], "w/", "m/", ["z.b"], [], {})
    merged = a.merged(b)
    assert merged.keys == ["x.w", "y.w", "z.w", "z.b"] and merged.buffers == ["z.b"] and merged.tied == {"y.w": "x.w"}


@pytest.mark.parametrize("world", [1, 2])
def test_consolidate_rebuilds_the_state_dict_that_loads_strictly(tmp_path, world):
    run_ranks(save, world, str(tmp_path))
    state = consolidate(tmp_path)
    want = trained_net().state_dict()
    assert list(state) == list(want), "the module's keys, in its order"
    assert all(torch.equal(state[k], v) and state[k].dtype == v.dtype for k, v in want.items())
    assert state["head.weight"] is state["embed.weight"]
    assert state["again.1.running_var"] is state["block.1.running_var"]
    fresh = Net()
    fresh.load_state_dict(state, strict=True)
    assert fresh.head.weight is fresh.embed.weight
    half = consolidate(tmp_path, dtype=torch.bfloat16, frozen=False)
    assert "frozen.weight" not in half and half["block.0.weight"].dtype == torch.bfloat16
    assert half["steps"].dtype == torch.int64, "dtype= converts floating-point tensors only"
