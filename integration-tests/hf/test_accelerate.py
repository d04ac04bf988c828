"""Hugging Face Accelerate on zero, the script unchanged (accelerate_script.py): ``Accelerator`` with a
DeepSpeed plugin (the config without an optimizer block: the script's torch AdamW and its warmup schedule,
built before ``prepare``, run on zero) trains a tiny GPT-2 on 2 ranks with the losses of the same script on
plain DDP at stages 2 and 3 (fp32, 12 steps of 2 accumulated micro-batches); ``save_state`` (twice to the
same folder, as Accelerate always reuses one tag) then ``load_state`` continues the curve exactly.

On CPU ranks the scripts run through cpu_state.py, which creates Accelerate's process state with
``cpu=True`` first (what ``TrainingArguments(use_cpu=True)`` does for the Trainer): without it Accelerate
finds no backend on a machine without an accelerator and counts one process per rank.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from hf_runs import CONFIGS, HERE, accelerate, zero_answers_import_deepspeed

TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def zero_is_deepspeed() -> None:
    if not zero_answers_import_deepspeed():
        pytest.fail("`import deepspeed` is not zero_all here: run `zero hf enable` in this environment first "
                    "(the nox session `hf` does)")


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return accelerate(tmp_path_factory.mktemp("ddp"), None)


@pytest.mark.parametrize("stage", [2, 3])
def test_accelerate_on_zero_matches_ddp_and_resumes_from_save_state(tmp_path: Path, ddp: dict, stage: int):
    config = f"accelerate_zero{stage}"
    straight = accelerate(tmp_path / "a", config, "--save-state", str(tmp_path / "state"), "--save-at", "6")
    assert (straight["distributed_type"], straight["engine"], straight["processes"]) == \
        ("DistributedType.DEEPSPEED", "Engine", 2)
    assert (ddp["distributed_type"], ddp["processes"]) == ("DistributedType.MULTI_CPU", 2)
    err = max(abs(a - b) for a, b in zip(straight["losses"], ddp["losses"], strict=True))
    assert err <= TOL, f"stage {stage}: {straight['losses']} vs DDP {ddp['losses']}"
    assert straight["lrs"] == pytest.approx(ddp["lrs"])  # the script's scheduler moved zero's learning rate
    resumed = accelerate(tmp_path / "b", config, "--load-state", str(tmp_path / "state"), "--resume-at", "6")
    assert resumed["losses"] == straight["losses"][6:] and resumed["lrs"] == straight["lrs"][6:]


def test_accelerate_launch_with_deepspeed_starts_zeros_ranks(tmp_path: Path):
    """``accelerate launch --use_deepspeed`` imports DeepSpeed's launcher names, then starts the ranks with
    torchrun; on CPU ranks Accelerate counts one process, and zero refuses the batch it computed, saying why."""

    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--use_deepspeed", "--deepspeed_config_file",
           str(CONFIGS / "accelerate_zero2.json"), "accelerate_script.py", "--out", str(tmp_path), "--steps", "2"]
    done = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    assert "train_batch_size: 8 != train_micro_batch_size_per_gpu 4 * gradient_accumulation_steps 2 * " \
           "data-parallel world size 2 (= 16) -- written for 1 rank: Accelerate on CPU ranks counts one process" \
           in done.stderr + done.stdout
