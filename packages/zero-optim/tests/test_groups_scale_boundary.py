"""What a torch-style training script reads from a ZeRO optimizer (each group's ``params``, the loss
scale), ``backward(boundary=False)`` (gradients kept local until the micro-step that ends the
accumulation), and ``refresh_master_weights`` after weights were loaded into the model."""

import pytest
import torch
from torch import nn

import zero_comm
from zero_comm.testing import run_ranks
from zero_optim import AdamW, ZeroConfig, ZeroOptimizer, ZeroStage3


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 2))


def test_each_group_lists_the_parameters_it_trains():
    run_ranks(each_group_lists_the_parameters_it_trains, 1)


def each_group_lists_the_parameters_it_trains() -> None:
    comm = zero_comm.init_distributed()
    net = model()
    net[0].bias.requires_grad_(False)
    decay, rest = [net[0].weight, net[2].weight], [net[0].bias, net[2].bias]
    opt = ZeroOptimizer([{"params": decay}, {"params": rest, "weight_decay": 0.0}], AdamW(lr=0.1), comm=comm)
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == [[id(p) for p in decay], [id(net[2].bias)]]
    assert opt.param_groups[1]["weight_decay"] == 0.0
    assert all("params" not in h for h in opt.checkpoint_meta()["hparams"]), "the meta stays small values"
    opt.load_state_dict(opt.state_dict())  # a round trip keeps the parameters listed
    assert [len(g["params"]) for g in opt.param_groups] == [2, 1]


def test_stage3_groups_list_their_parameters_and_the_rest_join_the_first():
    run_ranks(stage3_groups_list_their_parameters_and_the_rest_join_the_first, 1)


def stage3_groups_list_their_parameters_and_the_rest_join_the_first() -> None:
    comm = zero_comm.init_distributed()
    net = model()
    opt = ZeroStage3(net, AdamW(lr=0.1), comm=comm, config=ZeroConfig(stage=3),
                     param_groups=[{"params": [net[2].weight]}, {"params": [net[2].bias], "weight_decay": 0.0}])
    first = {id(p) for p in opt.param_groups[0]["params"]}
    assert first == {id(net[2].weight), id(net[0].weight), id(net[0].bias)}
    assert [id(p) for p in opt.param_groups[1]["params"]] == [id(net[2].bias)]


def test_loss_scale_is_the_scalers_and_one_without_fp16():
    run_ranks(loss_scale_is_the_scalers_and_one_without_fp16, 1)


def loss_scale_is_the_scalers_and_one_without_fp16() -> None:
    comm = zero_comm.init_distributed()
    assert ZeroOptimizer(model().parameters(), AdamW(), comm=comm).loss_scale == 1.0
    fp16 = ZeroOptimizer(model().parameters(), AdamW(), comm=comm, config=ZeroConfig(precision="fp16"))
    assert fp16.loss_scale == fp16.scaler.scale == 2.0 ** 16


def deferred(stage: int, defer: bool) -> list[torch.Tensor]:
    """Two micro-batches with accumulation_steps=1: the first kept local (boundary=False) or, without
    ``defer``, one backward of their summed losses."""
    comm = zero_comm.init_distributed()
    net = model()
    opt = ZeroOptimizer(net.parameters(), AdamW(lr=0.1), comm=comm,
                        config=ZeroConfig(stage=stage, bucket_numel=64))
    losses = []
    for micro in range(2):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(10 * comm.rank + micro))
        losses.append(net(x).square().mean())
    if defer:
        opt.backward(losses[0], boundary=False)
        opt.backward(losses[1])
    else:
        opt.backward(losses[0] + losses[1])
    assert opt.step()
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_a_backward_off_the_boundary_is_reduced_with_the_next(stage: int):
    got, want = run_ranks(deferred, 2, stage, True), run_ranks(deferred, 2, stage, False)
    for a, b in zip(got[0], want[0], strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(got[0], got[1], strict=True):
        assert torch.equal(a, b), "every rank steps on the same reduced gradients"


def test_a_backward_after_the_boundary_one_is_refused():
    run_ranks(a_backward_after_the_boundary_one_is_refused, 1)


def a_backward_after_the_boundary_one_is_refused() -> None:
    comm = zero_comm.init_distributed()
    net = model()
    opt = ZeroOptimizer(net.parameters(), AdamW(), comm=comm, config=ZeroConfig(stage=1))
    opt.backward(net(torch.randn(2, 8)).sum(), boundary=True)
    with pytest.raises(RuntimeError, match="step"):
        opt.backward(net(torch.randn(2, 8)).sum())


def refreshed(stage: int) -> bool:
    comm = zero_comm.init_distributed()
    net = model()
    opt = ZeroOptimizer(net.named_parameters(), AdamW(lr=0.1), comm=comm,
                        config=ZeroConfig(stage=stage, bucket_numel=64))
    torch.manual_seed(1)
    other = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 2))
    net.load_state_dict(other.state_dict())  # copied into the optimizer's flat buffer
    opt.refresh_master_weights()
    state = opt.sharded_state()
    for name, p in other.named_parameters():
        held = state.get(f"master/{name}")  # at stages 1-2 a rank holds pieces of some parameters only
        for piece in held.pieces if held is not None else []:
            if not torch.equal(piece.data, p.detach().view(-1)[piece.start:piece.stop]):
                return False
    return True


@pytest.mark.parametrize("stage", [0, 2])
def test_refresh_master_weights_takes_the_models_weights(stage: int):
    assert all(run_ranks(refreshed, 2, stage))
