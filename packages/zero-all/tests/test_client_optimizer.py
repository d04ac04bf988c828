"""A client torch optimizer and LR scheduler given to initialize train exactly as the same optimizer
and scheduler in a plain torch loop, at every ZeRO stage; their state resumes from a checkpoint."""

import functools
from pathlib import Path

import pytest
import torch
from test_engine import ACCUM, LR, STEPS, Net, micro_batch, reference, train_step

import zero_all as deepspeed
from zero_comm.testing import run_ranks

CLIP = 0.5


# -- the client's optimizers and schedulers (module level: the ranks unpickle them) ---------------
def adamw(params):
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.01)


def adagrad(params):  # not one of zero's rules: runs as the torch class on each shard
    return torch.optim.Adagrad(params, lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1)


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)


def ds_lion(params):  # deepspeed.ops.lion's: becomes zero's sharded Lion rule
    return deepspeed.ops.lion.DeepSpeedCPULion(params, lr=2e-3, betas=(0.9, 0.99), weight_decay=0.01)


def ds_adagrad(params):  # deepspeed.ops.adagrad's: torch's Adagrad under DeepSpeed's name
    return deepspeed.ops.adagrad.DeepSpeedCPUAdagrad(params, lr=0.1, weight_decay=1e-3)


def halving(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 0.5 ** k)


def cosine(optimizer):
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=STEPS, eta_min=1e-4)


def every_two(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.3)


def client_script(stage: int, make_optimizer, make_scheduler, as_callables: bool, root: str,
                  resume: bool) -> dict:
    """DeepSpeed's client-optimizer pattern: built before initialize (or handed over as callables)."""
    torch.manual_seed(0)
    model = Net()
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": ACCUM, "gradient_clipping": CLIP,
              "zero_optimization": {"stage": stage, "reduce_bucket_size": 2000,
                                    "stage3_param_persistence_threshold": 100}}
    if as_callables:
        engine, _, _, schedule = deepspeed.initialize(model=model, optimizer=make_optimizer,
                                                      lr_scheduler=make_scheduler, config=config)
    else:
        opt = make_optimizer(model.parameters())
        engine, _, _, schedule = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=make_scheduler(opt),
                                                      config=config)
    assert schedule is engine.lr_scheduler and schedule.optimizer is engine.basic_optimizer
    first = 0
    if resume:
        _, client = engine.load_checkpoint(Path(root) / "ckpt")
        first = client["step"]
    losses, lrs = [], []
    for step in range(first, STEPS):
        lrs.append(engine.get_lr())
        losses.append(train_step(engine, step))
        if not resume and step + 1 == 3:
            engine.save_checkpoint(Path(root) / "ckpt", client_state={"step": 3})
    return {"losses": losses, "lrs": lrs, "rule": engine.optimizer.rule.name}


CASES = {
    # name: stage, optimizer, scheduler, pass callables, the zero rule expected
    "adamw-stage2": (2, adamw, halving, False, "AdamW"),
    "adamw-callables-stage3": (3, adamw, cosine, True, "AdamW"),
    "sgd-nesterov-stage0": (0, sgd, every_two, False, "SGD"),
    "adagrad-as-torch-stage1": (1, adagrad, every_two, False, "Adagrad"),
    "deepspeed-cpu-lion-stage2": (2, ds_lion, halving, False, "Lion"),
    "deepspeed-cpu-adagrad-stage2": (2, ds_adagrad, every_two, False, "DeepSpeedCPUAdagrad"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_client_optimizer_and_scheduler_match_plain_torch(tmp_path: Path, case: str):
    stage, make_optimizer, make_scheduler, as_callables, rule = CASES[case]
    want = reference(2, CLIP, make_optimizer, make_scheduler)
    got = run_ranks(client_script, 2, stage, make_optimizer, make_scheduler, as_callables, str(tmp_path), False)[0]
    assert got["rule"] == rule
    assert len({tuple(lr) for lr in got["lrs"]}) > 1  # the schedule moved the learning rate
    err = max(abs(a - b) / abs(b) for a, b in zip(got["losses"], want, strict=True))
    assert err <= 1e-5, f"{case}: {got['losses']} vs plain torch {want}"
    if case == "adamw-stage2":  # the scheduler's state comes back with the checkpoint
        resumed = run_ranks(client_script, 2, stage, make_optimizer, make_scheduler, as_callables, str(tmp_path),
                            True)[0]
        assert resumed["lrs"] == got["lrs"][3:] and resumed["losses"] == got["losses"][3:]


def test_torch_rule_keeps_the_classes_state_in_the_shard():
    rule = deepspeed.TorchRule(torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 0.0, "weight_decay": 0.0,
                                                     "initial_accumulator_value": 0.5, "eps": 1e-10,
                                                     "foreach": None, "maximize": False, "differentiable": False,
                                                     "fused": None})
    assert rule.state_names == ("sum",)
    ref = torch.nn.Parameter(torch.arange(6.0))
    opt = torch.optim.Adagrad([ref], lr=0.1, initial_accumulator_value=0.5)
    master, state = torch.arange(6.0), {"sum": torch.zeros(6)}
    for step in (1, 2, 3):
        grad = torch.linspace(-1, 1, 6) * step
        ref.grad = grad.clone()
        opt.step()
        rule.update(master, grad * 4, state, step=step, hparams=rule.defaults, grad_scale=0.25, lowp_out=None)
        torch.testing.assert_close(master, ref.detach(), rtol=0, atol=0)
        torch.testing.assert_close(state["sum"], opt.state[ref]["sum"], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"torch\.optim\.ASGD keeps per-parameter state 'eta' that is not element"):
        deepspeed.TorchRule(torch.optim.ASGD, torch.optim.ASGD([torch.nn.Parameter(torch.zeros(1))]).defaults)
    with pytest.raises(ValueError, match=r"torch\.optim\.LBFGS cannot step a flat shard"):
        deepspeed.TorchRule(torch.optim.LBFGS, torch.optim.LBFGS([torch.nn.Parameter(torch.zeros(1))]).defaults)


def test_a_client_optimizer_or_scheduler_twice_over_is_refused():
    base = {"train_batch_size": 4}
    model = Net()
    with pytest.raises(deepspeed.ConfigError, match=r"optimizer: the config names 'AdamW' and initialize was given "
                                                    r"one too \(AdamW\); keep one"):
        deepspeed.initialize(model=model, optimizer=adamw(model.parameters()),
                             config={**base, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})
    with pytest.raises(deepspeed.ConfigError, match="scheduler: the config names 'WarmupLR' and initialize was "
                                                    "given lr_scheduler=function too; keep one"):
        deepspeed.initialize(model=Net(), optimizer=adamw, lr_scheduler=halving,
                             config={**base, "scheduler": {"type": "WarmupLR"}})
    other = adamw(Net().parameters())
    with pytest.raises(ValueError, match=r"the scheduler drives an optimizer \(AdamW\) other than the one given"):
        deepspeed.initialize(model=Net(), optimizer=adamw, lr_scheduler=halving(other), config=base)
    with pytest.raises(deepspeed.ConfigError, match=r"scheduler\.params\.warmup_max_l: .*'warmup_max_lr'"):
        deepspeed.initialize(model=Net(), optimizer=adamw,
                             config={**base, "scheduler": {"type": "WarmupLR", "params": {"warmup_max_l": 1}}})


def test_schedulers_drive_the_zero_optimizers_param_groups():
    """A torch scheduler built on the engine's basic_optimizer writes the LR the ZeRO step reads."""
    model = Net()
    engine, optimizer, _, schedule = deepspeed.initialize(
        model=model, lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.1),
        config={"train_batch_size": 4, "optimizer": {"type": "Adam", "params": {"lr": 1.0}}})
    assert isinstance(engine.basic_optimizer, torch.optim.Optimizer)
    assert engine.basic_optimizer.param_groups is optimizer.param_groups
    assert optimizer.param_groups[0]["initial_lr"] == 1.0
    x, y = micro_batch(0, 0, 0, 1)
    engine.backward(engine(x, y))
    engine.step()
    assert engine.get_lr() == pytest.approx([0.1]) and schedule.get_last_lr() == pytest.approx([0.1])


def scheduler_kept_by_the_client(stage: int) -> dict:
    """Accelerate's pattern: a torch scheduler built on the client optimizer and stepped by the script, never
    handed to initialize. The client optimizer stays the handle on the hyper-parameters, as in DeepSpeed."""
    torch.manual_seed(0)
    model = Net()
    opt = adamw(model.parameters())
    schedule = halving(opt)
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": ACCUM, "gradient_clipping": CLIP,
              "zero_optimization": {"stage": stage, "reduce_bucket_size": 2000}}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    losses, lrs = [], []
    for step in range(STEPS):
        losses.append(train_step(engine, step))
        lrs.append(engine.get_lr()[0])
        schedule.step()
    return {"losses": losses, "lrs": lrs}


def test_a_scheduler_on_the_client_optimizer_moves_the_engines_lr():
    want = reference(2, CLIP, adamw, halving)
    got = run_ranks(scheduler_kept_by_the_client, 2, 2)[0]
    assert got["lrs"][:3] == [LR, LR / 2, LR / 4]  # stepped with the lr the client's scheduler had set
    err = max(abs(a - b) / abs(b) for a, b in zip(got["losses"], want, strict=True))
    assert err <= 1e-5, f"{got['losses']} vs plain torch {want}"
