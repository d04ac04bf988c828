"""Offload fails loudly and early: a disk too small for the model's states is refused when the
optimizer is built (before anything is written), and a swap file that goes bad mid-run stops
training with an error naming it -- never a step taken with wrong weights."""

import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zero_comm
from zero_comm.testing import run_ranks
from zero_offload import NVMeStore, SwapIOError
from zero_optim import AdamW, ZeroConfig, ZeroStage3, partitioned

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "packages" / "zero-optim" / "tests"))
import zero_models


def build(swap_dir: str) -> tuple[torch.nn.Module, ZeroStage3, NVMeStore]:
    comm = zero_comm.init_distributed()
    with partitioned(comm):
        model = zero_models.make_model("gpt")
    store = NVMeStore(swap_dir, buffer_bytes=8 << 20)
    config = ZeroConfig(stage=3, offload_param=True, persistence_threshold=0)
    opt = ZeroStage3(model, AdamW(), comm=comm, config=config, store=store)
    return model, opt, store


def too_small(swap_dir: str) -> str:
    try:
        build(swap_dir)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
        # the store's own lock file (zero_offload marks a live store's directory) is not state
        state = [p for p in Path(swap_dir).rglob("*") if p.is_file() and p.name != ".owner.lock"]
        assert not state, f"state was written before the check: {state}"
        return str(exc)
    raise AssertionError("a disk too small for the states was accepted")


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 1 MiB filesystem (tmpfs); the test model's states need about 13 MiB."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True,
                          check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_disk_too_small_for_the_states_is_refused_before_training(small_disk: Path):
    message, = run_ranks(too_small, 1, str(small_disk))
    # about 1 MiB free (the store's lock file takes a block of it), against the states' 15.81 MiB
    assert str(small_disk) in message and re.search(r"has (1\.00 MiB|10\d\d KiB) free; the offloaded state "
                                                    r"needs 15\.81 MiB", message), message


def bad_swap_file(swap_dir: str) -> str:
    model, opt, store = build(swap_dir)
    x, y = zero_models.batch("gpt", 0, 4)
    opt.backward(model(x, y))
    assert opt.step()
    store.drop_cache()
    victim = sorted(store.directory.glob("*master*"))[0]
    os.truncate(victim, 4096)  # the device lost the end of a file
    try:
        opt.backward(model(x, y))
        opt.step()
    except SwapIOError as exc:
        return f"{victim.name}|{exc}"
    raise AssertionError("training went on with a truncated swap file")


def test_a_swap_file_that_goes_bad_mid_run_is_an_error_naming_it(tmp_path: Path):
    result, = run_ranks(bad_swap_file, 1, str(tmp_path))
    name, message = result.split("|", 1)
    assert name in message and "expected" in message
