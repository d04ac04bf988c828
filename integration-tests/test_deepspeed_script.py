"""An unchanged DeepSpeed-style script (deepspeed_script.py) trains through zero for every config
it would take under DeepSpeed, and its losses equal a plain single-process torch loop.

Each case writes a ds_config.json, launches the script on 2 Gloo ranks with ``zero run``
(which goes through torch.distributed.run, as ``deepspeed`` goes through its launcher),
and compares the loss of every optimizer step with the plain loop: fp32 to 1e-5,
bf16 and fp16 to a stated tolerance. The script saves a checkpoint halfway, rebuilds
its engine from scratch and loads it, so every case also proves the resume is exact.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
from gpt import GPT, GPTConfig, global_batch  # noqa: E402

STEPS, SAVE_AT, MICRO, WORLD, LR, WD = 6, 3, 4, 2, 3e-3, 0.01
CFG = GPTConfig()


def warmup_lr(kind: str, lo: float, hi: float, n: int):
    """DeepSpeed's WarmupLR, written from its definition: the LR of optimizer step k (the scheduler
    steps after each optimizer step, and starts at its minimum)."""
    n = max(2, n)

    def lr(k: int) -> float:
        it = k - 1  # the scheduler's last_batch_iteration when step k runs
        if it < 0:
            return lo
        if it >= n:
            return hi
        gamma = math.log(it + 1) / math.log(n) if kind == "log" else it / n
        return lo + (hi - lo) * gamma

    return lr


def reference(accum: int, clip: float, schedule) -> list[float]:
    """The plain loop: one process, the whole global batch, torch.optim.AdamW."""
    torch.manual_seed(0)
    model = GPT(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    losses = []
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = schedule(step) if schedule else LR
        total = 0.0
        for m in range(accum):
            x, y = global_batch(step * accum + m, MICRO * WORLD, CFG)
            loss = model(x, y) / accum
            loss.backward()
            total += loss.item()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses


CASES = {
    # name: (zero_optimization, extra top-level keys, gradient_accumulation_steps, clip, warmup)
    "stage0": ({"stage": 0}, {}, 1, 0.0, None),
    "stage1-accum": ({"stage": 1}, {}, 2, 0.0, None),
    "stage2-clip-accum": ({"stage": 2, "reduce_bucket_size": 5000}, {}, 2, 0.5, None),
    "stage3-warmuplr": ({"stage": 3, "stage3_param_persistence_threshold": 100}, {}, 1, 0.0, ("linear", 1e-4, LR, 4)),
    "stage1-warmuplr-log": ({"stage": 1}, {}, 1, 1.0, ("log", 0.0, LR, 3)),
    "stage2-cpu-offload": ({"stage": 2, "offload_optimizer": {"device": "cpu"}}, {}, 2, 1.0, None),
    "stage3-nvme-offload": ({"stage": 3, "stage3_param_persistence_threshold": 100,
                             "offload_optimizer": {"device": "nvme", "nvme_path": "{nvme}"},
                             "offload_param": {"device": "nvme", "nvme_path": "{nvme}"}}, {}, 1, 1.0, None),
    "stage2-fp16": ({"stage": 2}, {"fp16": {"enabled": True, "initial_scale_power": 8}}, 1, 1.0, None),
    "stage3-bf16": ({"stage": 3, "stage3_param_persistence_threshold": 100}, {"bf16": {"enabled": True}}, 2, 1.0,
                    None),
}


def launch(script: Path, config: Path, out: Path, timeout: float = 240) -> None:
    cmd = [sys.executable, "-m", "zero_all", "run", "--nproc", str(WORLD), str(script),
           "--deepspeed", "--deepspeed_config", str(config), "--steps", str(STEPS), "--save-at", str(SAVE_AT),
           "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"zero run exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


@pytest.mark.parametrize("case", list(CASES))
def test_deepspeed_script_matches_plain_torch(case, tmp_path):
    zero, extra, accum, clip, warmup = CASES[case]
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    zero = json.loads(json.dumps(zero).replace("{nvme}", str(nvme)))
    config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": accum,
              "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WD}},
              "gradient_clipping": clip, "zero_optimization": zero, "steps_per_print": 100, **extra}
    schedule = None
    if warmup:
        kind, lo, hi, n = warmup
        config["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": lo, "warmup_max_lr": hi,
                                                              "warmup_num_steps": n, "warmup_type": kind}}
        schedule = warmup_lr(kind, lo, hi, n)
    (tmp_path / "ds_config.json").write_text(json.dumps(config))
    launch(HERE / "deepspeed_script.py", tmp_path / "ds_config.json", tmp_path)

    got = json.loads((tmp_path / "losses.json").read_text())
    want = reference(accum, clip, schedule)
    assert got["global_steps"] == STEPS
    if schedule:
        assert got["lrs"] == pytest.approx([schedule(k) for k in range(STEPS)], rel=1e-12)
    low_precision = "fp16" in extra or "bf16" in extra
    tol = 3e-2 if low_precision else 1e-5
    rel = [abs(a - b) / abs(b) for a, b in zip(got["losses"], want)]
    assert max(rel) <= tol, f"{case}: losses {got['losses']} vs plain torch {want} (worst rel {max(rel):.2e})"
    assert got["losses"][-1] < got["losses"][0]  # and it learns
