"""Every steps_per_print steps rank 0 logs one progress line; the CSV monitor writes DeepSpeed's event
files; wall_clock_breakdown adds forward/backward/step timings."""

import csv
import json
import logging
from pathlib import Path

import pytest
import torch
from test_engine import ACCUM, MICRO, Net, train_step
from torch import nn

import zero_all as deepspeed
from zero_comm.testing import run_ranks

STEPS, EVERY = 4, 2


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def monitored(root: str) -> dict:
    lines = Lines()
    logging.getLogger("zero_all").addHandler(lines)
    logging.getLogger("zero_all").setLevel(logging.INFO)  # the application's choice: zero sets no level
    torch.manual_seed(0)
    config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": ACCUM,
              "steps_per_print": EVERY, "wall_clock_breakdown": True,
              "csv_monitor": {"enabled": True, "output_path": root, "job_name": "run1"},
              "zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}}
    engine, _, _, _ = deepspeed.initialize(model=Net(), config=config)
    losses = [train_step(engine, step) for step in range(STEPS)]
    return {"lines": lines.lines, "losses": losses, "batch": engine.train_batch_size()}


def read(path: Path) -> list[list[str]]:
    with path.open() as f:
        return list(csv.reader(f))


def test_progress_lines_and_csv_events(tmp_path: Path):
    got = run_ranks(monitored, 2, str(tmp_path))
    assert got[1]["lines"] == []  # rank 0 reports for all
    lines, losses, batch = got[0]["lines"], got[0]["losses"], got[0]["batch"]
    assert [line.split()[0] for line in lines] == ["step=2", "step=4"]
    for line, step in zip(lines, (2, 4), strict=True):
        fields = dict(part.split("=", 1) for part in line.split())
        assert float(fields["loss"]) == pytest.approx(losses[step - 1], rel=1e-5)  # the mean over every rank
        assert fields["lr"] == "[0.01]" and fields["loss_scale"] == "1" and float(fields["samples/s"]) > 0
        memory = json.loads(fields["peak_rss_mib"])  # one figure per rank
        assert len(memory) == 2 and all(m > 50 for m in memory)
        assert all(float(fields[f"{phase}_ms"]) > 0 for phase in ("forward", "backward", "step"))

    files = sorted(p.name for p in (tmp_path / "run1").iterdir())
    assert files == ["Train_Samples_elapsed_time_ms_backward.csv", "Train_Samples_elapsed_time_ms_forward.csv",
                     "Train_Samples_elapsed_time_ms_step.csv", "Train_Samples_lr.csv",
                     "Train_Samples_train_loss.csv"]
    rows = read(tmp_path / "run1" / "Train_Samples_train_loss.csv")
    assert rows[0] == ["step", "train_loss"]
    assert [int(r[0]) for r in rows[1:]] == [batch * k for k in range(1, STEPS + 1)]  # against samples trained
    assert [float(r[1]) for r in rows[1:]] == pytest.approx(losses, rel=1e-5)
    assert read(tmp_path / "run1" / "Train_Samples_lr.csv")[1:] == [[str(batch * k), "0.01"] for k in range(1, 5)]
    forward = read(tmp_path / "run1" / "Train_Samples_elapsed_time_ms_forward.csv")
    assert forward[0] == ["step", "elapsed_time_ms_forward"] and len(forward) == 1 + STEPS // EVERY


class TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.head = nn.Linear(8, 11)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self.head(self.embed(ids)).flatten(0, 1), ids.flatten())


def test_a_progress_line_reaches_logging_with_tokens_per_second(caplog):
    caplog.set_level(logging.INFO, logger="zero_all")
    engine, _, _, _ = deepspeed.initialize(model=TokenModel(), config={
        "train_batch_size": 2, "steps_per_print": 1, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}})
    ids = torch.randint(0, 11, (2, 5))
    engine.backward(engine(ids))
    engine.step()
    lines = [r.getMessage() for r in caplog.records if r.name == "zero_all"]
    assert len(lines) == 1 and lines[0].startswith("step=1 skipped=0 loss=")
    assert "tokens/s=" in lines[0] and "forward_ms" not in lines[0]  # no breakdown unless asked for


def test_tensorboard_needs_tensorboard(tmp_path: Path):
    config = {"train_batch_size": 2, "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
              "tensorboard": {"enabled": True, "output_path": str(tmp_path), "job_name": "tb"}}
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(deepspeed.ConfigError, match=r"^tensorboard\.enabled: install tensorboard"):
            deepspeed.initialize(model=TokenModel(), config=config)
        return
    engine, _, _, _ = deepspeed.initialize(model=TokenModel(), config={**config, "steps_per_print": 1})
    engine.backward(engine(torch.randint(0, 11, (2, 5))))
    engine.step()
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


def test_the_progress_bar_counts_toward_the_schedule_end(monkeypatch):
    import io
    import time

    from zero_all._engine._monitor import ProgressBar

    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    stream = io.StringIO()
    bar = ProgressBar(stream, total=10)
    for step in (1, 2):  # two steps at 2 s each
        now[0] += 2.0
        bar.update(step)
    monkeypatch.undo()
    last = stream.getvalue().split("\r\x1b[K")[-1]
    assert last == "step 2/10 [#####-------------------] 0.5 steps/s, 0m16s left"
    bar.clear()
    assert stream.getvalue().endswith("\r\x1b[K") and not bar.drawn
    unknown = ProgressBar(io.StringIO(), total=None)
    unknown.update(3)
    assert "step 3 " in unknown.stream.getvalue() and "left" not in unknown.stream.getvalue()
