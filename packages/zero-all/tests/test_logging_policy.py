"""zero leaves logging to the application: importing it or building an engine installs no handler
and sets no level; a warning every rank would give is logged by rank 0 only; the progress bar is
drawn on a terminal only, can be turned off by config or ZERO_PROGRESS=0, and leaves no half line."""

import io
import json
import logging
import subprocess
import sys

import pytest
import torch

import zero_all as deepspeed
from zero_all._engine._monitor import ProgressBar, progress_wanted
from zero_comm.testing import run_ranks

SGD = {"type": "SGD", "params": {"lr": 0.1}}

_FRESH = r"""
import json, logging, torch
import zero_all as deepspeed
engine, _, _, _ = deepspeed.initialize(model=torch.nn.Linear(4, 1), config={
    "train_batch_size": 2, "steps_per_print": 1, "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 2, "warmup_num_steps": 5}}})
engine.backward(engine(torch.randn(2, 4)).sum())
engine.step()
engine.destroy()
loggers = {name: (len(lg.handlers), lg.level, lg.propagate) for name, lg in logging.root.manager.loggerDict.items()
           if isinstance(lg, logging.Logger) and name.split(".")[0].startswith("zero")}
print(json.dumps({"loggers": loggers, "root": len(logging.getLogger().handlers)}))
"""


def test_importing_and_training_configure_no_logging():
    """In a fresh interpreter: after initialize, a step that logs and a scheduler warning."""
    out = subprocess.run([sys.executable, "-c", _FRESH], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert "zero_all" in got["loggers"] and got["root"] == 0
    for name, (handlers, level, propagate) in got["loggers"].items():
        assert (handlers, level, propagate) == (0, logging.NOTSET, True), name
    assert "step=1" not in out.stderr  # INFO is the application's to show; WARNING reaches lastResort
    assert "WarmupDecayLR: total_num_steps 2 is less than warmup_num_steps 5" in out.stderr


def _warned(_root: str) -> list[str]:
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    logging.getLogger().addHandler(Keep())
    deepspeed.initialize(model=torch.nn.Linear(4, 1), config={
        "train_micro_batch_size_per_gpu": 1, "optimizer": SGD,
        "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 2, "warmup_num_steps": 5}}})
    return [m for m in seen if "WarmupDecayLR" in m]


def test_a_config_warning_is_logged_once_on_two_ranks(tmp_path):
    got = run_ranks(_warned, 2, str(tmp_path))
    assert got[0] == ["[Rank 0] WarmupDecayLR: total_num_steps 2 is less than warmup_num_steps 5"]
    assert got[1] == []


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_bar_is_wanted_on_rank_0_on_a_terminal_unless_turned_off(monkeypatch):
    from zero_all._config import load_config

    on, off = load_config({"train_batch_size": 2}), load_config({"train_batch_size": 2, "progress_bar": False})
    monkeypatch.delenv("ZERO_PROGRESS", raising=False)
    assert progress_wanted(on, 0, _Terminal())
    assert not progress_wanted(on, 1, _Terminal())  # one bar, rank 0's
    assert not progress_wanted(on, 0, io.StringIO())  # a file or pipe gets no carriage returns
    assert not progress_wanted(off, 0, _Terminal())
    for value in ("0", "false", "off"):
        monkeypatch.setenv("ZERO_PROGRESS", value)
        assert not progress_wanted(on, 0, _Terminal())
    monkeypatch.setenv("ZERO_PROGRESS", "1")
    assert progress_wanted(on, 0, _Terminal())


@pytest.mark.parametrize("tty", [True, False])
def test_an_engine_draws_on_a_terminal_only_and_leaves_no_half_line(monkeypatch, tty):
    monkeypatch.delenv("ZERO_PROGRESS", raising=False)
    err = _Terminal() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    engine, _, _, _ = deepspeed.initialize(model=torch.nn.Linear(4, 1), config={
        "train_batch_size": 2, "steps_per_print": 0, "optimizer": SGD,
        "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 3, "warmup_num_steps": 1}}})
    for _ in range(2):
        engine.backward(engine(torch.randn(2, 4)).sum())
        engine.step()
    if not tty:
        engine.destroy()
        assert "\r" not in err.getvalue()
        return
    assert "\r\x1b[Kstep 1/3 [" in err.getvalue() and "\r\x1b[Kstep 2/3 [" in err.getvalue()  # in place
    assert "\n" not in err.getvalue()
    engine.destroy()  # mid-run: the bar is erased
    assert err.getvalue().endswith("\r\x1b[K")


def test_the_bar_ends_on_a_newline_at_the_schedule_end():
    stream = io.StringIO()
    bar = ProgressBar(stream, total=2)
    bar.update(1)
    bar.update(2)
    assert stream.getvalue().endswith(" steps/s\n") and not bar.drawn
    bar.clear()  # nothing left to erase
    assert stream.getvalue().endswith("\n")
