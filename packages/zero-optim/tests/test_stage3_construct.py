"""Initialisation code under partitioned construction (DeepSpeed's ``zero.Init``): an init loop, a
Hugging Face style ``self.apply(self._init_weights)`` and ``p.data.normal_()`` run unchanged inside the
block and give exactly the parameters eager construction gives under the same seed, holding no more
than a module's worth of full parameters; outside the block, a released parameter's error names it by
its path in the model and says how to gather it."""

import re

import pytest
import torch
from torch import nn

import zero_comm
from zero_comm.testing import run_ranks
from zero_kernels import peak_memory
from zero_optim import PartitionedParameter, PartitionedParameterError, gathered, partitioned

VOCAB, WIDTH = 40, 24


class HFStyle(nn.Module):
    """Initialised the way Hugging Face models are: ``self.apply(self._init_weights)`` writing ``.data``."""

    def __init__(self, layers: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, WIDTH, padding_idx=0)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.LayerNorm(WIDTH))
                                    for _ in range(layers))
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=0.02)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=0.02)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)


class InitLoop(nn.Module):
    """An init loop over ``self.modules()`` with ``nn.init``, a parameter of its own, and one op that
    reads two partitioned parameters at once."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.empty(8, WIDTH))
        self.a = nn.Linear(WIDTH, WIDTH)
        self.b = nn.Linear(WIDTH, WIDTH)
        self.conv = nn.Conv1d(WIDTH, 4, 3)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos, std=0.02)
        with torch.no_grad():
            self.b.weight.add_(self.a.weight)  # a and b are each a module's worth: both must stay whole


def build_both(factory: type[nn.Module]) -> dict:
    """Build ``factory()`` eagerly and partitioned from the same seed; compare the gathered result."""
    comm = zero_comm.init_distributed()
    torch.manual_seed(3)
    eager = factory()
    torch.manual_seed(3)
    with partitioned(comm):
        model = factory()
    all_partitioned = all(isinstance(p, PartitionedParameter) for p in model.parameters())
    released = all(not p.zero.unit.gathered for p in model.parameters())
    with gathered(list(model.parameters())):
        got = {k: v.clone() for k, v in model.state_dict().items()}
    return {"equal": {k: torch.equal(v, got[k]) for k, v in eager.state_dict().items()},
            "all_partitioned": all_partitioned, "released": released,
            "tied": model.head.weight is model.emb.weight if factory is HFStyle else True,
            "no_hooks": all(p.zero.unit.on_released_use is None for p in model.parameters())}


@pytest.mark.parametrize("factory", [HFStyle, InitLoop])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_init_code_in_the_block_gives_eager_values_bit_for_bit(factory, world_size):
    for r in run_ranks(build_both, world_size, factory):
        assert all(r["equal"].values()), [k for k, same in r["equal"].items() if not same]
        assert r["all_partitioned"] and r["released"] and r["tied"]
        assert r["no_hooks"], "the block's gather-on-use must end with the block"


LAYERS, BIG = 8, 256


class DeepInit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(BIG, BIG) for _ in range(LAYERS))
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(std=0.02)
            module.bias.data.zero_()


def construction_peak() -> dict:
    comm = zero_comm.init_distributed()
    holder: dict = {}

    def build() -> None:
        with partitioned(comm):
            holder["model"] = DeepInit()

    peak = peak_memory(build)
    return {"peak": peak, "psi": sum(p.numel() for p in holder["model"].parameters()), "world": comm.world_size}


@pytest.mark.parametrize("world_size", [2, 4])
def test_an_init_pass_holds_one_module_whole_at_a_time(world_size):
    layer = BIG * BIG + BIG
    for r in run_ranks(construction_peak, world_size):
        # this rank's shards, one layer being built and one being initialised (plus the shard copies of
        # the unit being scattered back): far below the whole model
        want = (r["psi"] / r["world"] + 2.5 * layer) * 4
        assert r["peak"] <= want, f"peak {r['peak'] / 2**20:.2f} MiB > {want / 2**20:.2f} MiB"
        assert r["peak"] < r["psi"] * 4  # the whole model, fp32, never existed on a rank


def errors_outside_the_block() -> dict:
    comm = zero_comm.init_distributed()
    torch.manual_seed(0)
    with partitioned(comm):
        model = HFStyle()
    out = {}
    # the lambdas defer each access into the try (reading .data is what is checked)
    for what, touch in (("data", lambda: model.layers[1][0].weight.data.normal_()),  # noqa: PLW0108
                        ("op", lambda: model.layers[1][0].weight * 2),
                        ("init", lambda: nn.init.zeros_(model.layers[1][1].bias))):
        try:
            touch()
            out[what] = None
        except PartitionedParameterError as e:
            out[what] = str(e)
    return out


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_released_parameter_outside_the_block_is_named_by_its_path(world_size):
    for r in run_ranks(errors_outside_the_block, world_size):
        for what in ("data", "op"):
            assert r[what] and "'layers.1.0.weight'" in r[what], r[what]
            assert "GatheredParameters" in r[what] and "zero_optim.gathered" in r[what]
        assert "'layers.1.1.bias'" in r["init"]
        assert "reading .data" in r["data"]
        ranges = re.findall(r"elements \[\d+, \d+\)", r["op"])
        assert bool(ranges) == (world_size > 1), r["op"]  # at one rank the shard is the whole parameter


def raise_inside_the_block() -> dict:
    comm = zero_comm.init_distributed()
    made: list[nn.Module] = []
    with pytest.raises(ValueError, match="bad config"), partitioned(comm):
        made.append(nn.Linear(4, 4))
        made[0].weight.data.normal_()  # gathered by the block ...
        raise ValueError("bad config")  # ... and the user's error propagates
    p = made[0].weight
    return {"released": not p.zero.unit.gathered, "hook": p.zero.unit.on_released_use}


def test_an_error_inside_the_block_leaves_nothing_gathered():
    r, = run_ranks(raise_inside_the_block, 1)
    assert r == {"released": True, "hook": None}
