"""DeepSpeed's LR schedules give DeepSpeed's learning rates, step by step; a config's scheduler
block is checked by name."""

import math
from pathlib import Path

import pytest
import torch
from test_engine import Net, micro_batch

import zero_all as deepspeed
from zero_all import LRRangeTest, OneCycle, WarmupCosineLR, WarmupDecayLR, WarmupLR, build_scheduler
from zero_comm.testing import run_ranks


def optimizer(groups: int = 1, lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for _ in range(groups)])


def run(schedule, opt, steps: int) -> list[list[float]]:
    """The LRs in force at each optimizer step 0..steps-1 (the engine steps the schedule after each)."""
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in opt.param_groups])
        schedule.step()
    return out


def test_warmup_lr_log_and_linear():
    lo, hi, n = 0.01, 0.1, 5
    opt = optimizer()
    got = run(WarmupLR(opt, warmup_min_lr=lo, warmup_max_lr=hi, warmup_num_steps=n), opt, 9)
    # a fresh schedule starts at the minimum (iteration -1), then log(k + 1) / log(n) of the way at iteration k
    want = [lo] + [lo + (hi - lo) * math.log(k + 1) / math.log(n) for k in range(n)] + [hi] * 3
    assert [g[0] for g in got] == pytest.approx(want, rel=1e-12)
    opt = optimizer(groups=2)
    got = run(WarmupLR(opt, warmup_min_lr=[0.0, 0.02], warmup_max_lr=hi, warmup_num_steps=4, warmup_type="linear"),
              opt, 7)
    assert [g[0] for g in got] == pytest.approx([0.0, 0.0, 0.025, 0.05, 0.075, 0.1, 0.1], rel=1e-12)
    assert [g[1] for g in got] == pytest.approx([0.02, 0.02, 0.04, 0.06, 0.08, 0.1, 0.1], rel=1e-12)


def test_warmup_lr_defaults_to_the_optimizers_lr_and_at_least_two_steps():
    opt = optimizer(lr=0.3)
    schedule = WarmupLR(opt, warmup_num_steps=1, warmup_type="linear")  # n is raised to 2, as DeepSpeed does
    assert [g[0] for g in run(schedule, opt, 4)] == pytest.approx([0.0, 0.0, 0.15, 0.3])
    assert schedule.get_last_lr() == pytest.approx([0.3])


def test_warmup_decay_lr():
    opt = optimizer()
    got = run(WarmupDecayLR(opt, total_num_steps=10, warmup_max_lr=0.1, warmup_num_steps=4, warmup_type="linear"),
              opt, 14)
    # warm up k / 4, then (10 - k) / (10 - 4) of the maximum, never below 0
    want = [0.0] + [0.1 * k / 4 for k in range(4)] + [0.1 * max(0.0, (10 - k) / 6) for k in range(4, 13)]
    assert [g[0] for g in got] == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_warmup_cosine_lr_scales_the_optimizers_lr():
    base, total, n, wmin, cmin = 0.1, 12, 4, 0.2, 0.1
    opt = optimizer(lr=base)
    got = run(WarmupCosineLR(opt, total_num_steps=total, warmup_min_ratio=wmin, warmup_num_steps=n,
                             cos_min_ratio=cmin), opt, 16)
    want = [0.0]  # DeepSpeed's ratio before the first step
    want += [base * (wmin + (1 - wmin) * math.log(k + 1) / math.log(n)) for k in range(n)]
    for k in range(n, 15):
        progress = min(1.0, (k - n + 1) / (total - n))
        want.append(base * (cmin + (1 - cmin) * (1 + math.cos(math.pi * progress)) / 2))
    assert [g[0] for g in got] == pytest.approx(want, rel=1e-12)


def test_one_cycle_lr_and_momentum():
    opt = optimizer()
    schedule = OneCycle(opt, cycle_min_lr=0.01, cycle_max_lr=0.11, cycle_first_step_size=4, cycle_second_step_size=2,
                        decay_step_size=2, decay_lr_rate=1.0, cycle_min_mom=0.85, cycle_max_mom=0.95)
    assert opt.param_groups[0]["betas"] == (0.85, 0.99)
    lrs, moms = [], []
    for _ in range(9):
        lrs.append(opt.param_groups[0]["lr"])
        moms.append(opt.param_groups[0]["betas"])
        schedule.step()
    # position s in the cycle at iteration k (batch k + 1 of 6: up over 4, down over 2); then min / (1 + d / 2)
    s = [0.25, 0.5, 0.75, 1.0, 0.5]
    assert lrs == pytest.approx([0.01] + [0.01 + 0.1 * x for x in s] + [0.01, 0.01 / 1.5, 0.01 / 2], rel=1e-12)
    assert [m[0] for m in moms[1:6]] == pytest.approx([0.95 - 0.1 * x for x in s], rel=1e-12)
    assert all(m[1] == 0.99 for m in moms)  # DeepSpeed's second beta while momentum cycles


def test_one_cycle_stairs():
    opt = optimizer()
    schedule = OneCycle(opt, cycle_min_lr=0.01, cycle_max_lr=0.11, cycle_first_step_size=4, cycle_second_step_size=2,
                        cycle_first_stair_count=2)
    got = [g[0] for g in run(schedule, opt, 6)]
    # two stairs per half: the position floor(at * 2 / 4) / 2 going up, floor((6 - at) * 2 / 2) / 2 coming down
    assert got == pytest.approx([0.01, 0.01, 0.06, 0.06, 0.11, 0.06], rel=1e-12)


def test_lr_range_test():
    opt = optimizer(groups=2)
    got = run(LRRangeTest(opt, lr_range_test_min_lr=[1e-3, 2e-3], lr_range_test_step_size=4,
                          lr_range_test_step_rate=2.0), opt, 5)
    assert [g[1] for g in got] == pytest.approx([2e-3 * (1 + 2.0 * k / 4) for k in range(5)], rel=1e-12)
    opt = optimizer()
    got = run(LRRangeTest(opt, lr_range_test_min_lr=1e-3, lr_range_test_step_size=4, lr_range_test_step_rate=2.0,
                          lr_range_test_staircase=True), opt, 9)
    assert [g[0] for g in got] == pytest.approx([1e-3 * (1 + 2.0 * (k // 4)) for k in range(9)], rel=1e-12)


def test_a_schedule_resumes_from_its_state_dict():
    def make(opt):
        return WarmupDecayLR(opt, total_num_steps=20, warmup_max_lr=0.1, warmup_num_steps=5)

    opt = optimizer()
    straight = make(opt)
    for _ in range(7):
        straight.step()
    state = straight.state_dict()
    assert state == {"last_batch_iteration": 6}
    resumed = make(optimizer())
    resumed.load_state_dict(state)
    assert resumed.get_last_lr() == straight.get_last_lr()
    straight.step()
    resumed.step()
    assert resumed.get_last_lr() == straight.get_last_lr()


def test_a_config_scheduler_block_is_checked_by_name():
    opt = optimizer()
    assert isinstance(build_scheduler("WarmupLR", {"warmup_max_lr": 0.1, "warmup_num_steps": 1e3}, opt), WarmupLR)
    assert isinstance(build_scheduler("StepLR", {"step_size": 2}, opt), torch.optim.lr_scheduler.StepLR)
    peak = optimizer().param_groups[0]["lr"]  # "auto" peak: the optimizer's lr, as the Trainer fills it
    warm = build_scheduler("WarmupLR", {"warmup_max_lr": "auto", "warmup_num_steps": 2, "warmup_type": "linear"},
                           optimizer())
    for _ in range(3):
        warm.step()
    assert warm.get_last_lr() == [peak]
    bad = [
        ("WarmupLr", {}, r"scheduler\.type: unknown schedule 'WarmupLr'; did you mean 'WarmupLR'\?"),
        ("WarmupLR", {"warmup_max_l": 1.0}, r"scheduler\.params\.warmup_max_l: .*did you mean 'warmup_max_lr'\?"),
        ("WarmupDecayLR", {}, r"scheduler\.params\.total_num_steps: WarmupDecayLR needs it"),
        ("WarmupDecayLR", {"total_num_steps": "auto"},
         r"scheduler\.params\.total_num_steps: \"auto\" is filled in by Hugging Face's Trainer from max_steps"),
        ("WarmupLR", {"warmup_type": "cosine"}, r"scheduler\.params\.warmup_type: must be 'log' or 'linear'"),
        ("WarmupCosineLR", {"total_num_steps": 0}, r"scheduler\.params\.total_num_steps: must be a positive integer"),
        ("OneCycle", {"cycle_min_lr": 0.1, "cycle_max_lr": [0.1, 0.2]},
         r"scheduler\.params\.cycle_max_lr: expected one value per parameter group \(1\), got 2"),
        ("StepLR", {}, r"scheduler\.params\.step_size: StepLR needs it"),
    ]
    for kind, params, message in bad:
        with pytest.raises(deepspeed.ConfigError, match=message) as info:
            build_scheduler(kind, params, opt)
        assert "\n" not in str(info.value)


# -- the engine steps the config's scheduler -------------------------------------------------------
def config_scheduler_script(root: str, resume: bool) -> dict:
    torch.manual_seed(0)
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
              "zero_optimization": {"stage": 2, "reduce_bucket_size": 2000},
              "optimizer": {"type": "AdamW", "params": {"lr": 0.5}},
              "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 6, "warmup_min_lr": 1e-3,
                                                                "warmup_max_lr": 1e-2, "warmup_num_steps": 3,
                                                                "warmup_type": "linear"}}}
    engine, _, _, schedule = deepspeed.initialize(model=Net(), config=config)
    assert isinstance(schedule, WarmupDecayLR)
    rank, world = engine.comm.rank, engine.comm.world_size
    first = 0
    if resume:
        first = engine.load_checkpoint(Path(root))[1]["step"]
    lrs, losses = [], []
    for step in range(first, 6):
        lrs.append(engine.get_lr()[0])
        total = torch.zeros(())
        for micro in range(2):
            loss = engine(*micro_batch(step, micro, rank, world))
            engine.backward(loss * float("inf") if step == 2 and micro == 0 else loss)  # step 2 overflows
            engine.step()
            total += loss.detach()
        losses.append(engine.comm.all_reduce(total, "avg").item())
        if not resume and step == 2:
            engine.save_checkpoint(Path(root), client_state={"step": 3})
    return {"lrs": lrs, "losses": losses, "steps": (engine.global_steps, engine.skipped_steps),
            "iteration": schedule.last_batch_iteration}


def test_the_engine_steps_the_config_scheduler_unless_the_step_was_skipped(tmp_path):
    straight = run_ranks(config_scheduler_script, 2, str(tmp_path), False)[0]

    def lr(k: int) -> float:  # WarmupDecayLR at iteration k: linear warmup over 3, then down to 0 at 6
        gamma = k / 3 if k < 3 else (6 - k) / 3
        return 1e-3 + 9e-3 * gamma if k >= 0 else 1e-3

    # the scheduler did not step after the skipped step 2: iteration 1's rate holds for steps 2 and 3
    assert straight["lrs"] == pytest.approx([lr(-1), lr(0), lr(1), lr(1), lr(2), lr(3)], rel=1e-12)
    assert straight["steps"] == (6, 1) and straight["iteration"] == 4  # DeepSpeed counts skipped steps too
    resumed = run_ranks(config_scheduler_script, 2, str(tmp_path), True)[0]
    assert resumed["lrs"] == straight["lrs"][3:] and resumed["losses"] == straight["losses"][3:]
    assert resumed["steps"] == straight["steps"] and resumed["iteration"] == straight["iteration"]
