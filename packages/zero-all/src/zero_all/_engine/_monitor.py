"""What a training run reports: a progress line, CSV files, TensorBoard events, wall-clock timings.

Every ``steps_per_print`` optimizer steps rank 0 logs one line through the ``logging``
logger ``"zero_all"``: the step, the mean loss of the last step over all ranks (when
the engine saw one in ``backward``), the learning rates, the loss scale, samples/s
(and tokens/s when the model is fed token ids) since the previous line, and each
rank's peak memory (``torch.cuda.max_memory_allocated`` on CUDA, the process's peak
RSS on the CPU). With ``wall_clock_breakdown`` it adds the time spent in forward,
backward and step over the interval (CUDA is synchronised around each, so the
figures are real and the run is slower).

The ``csv_monitor`` and ``tensorboard`` blocks write DeepSpeed's events, named as
DeepSpeed names them (``Train/Samples/train_loss``, ``Train/Samples/lr``,
``Train/Samples/loss_scale`` with fp16, ``Train/Samples/elapsed_time_ms_*`` with
``wall_clock_breakdown``), against the number of samples trained, under
``output_path/job_name``: the CSV monitor one ``<event with / as _>.csv`` per event
with a ``step,<last part of the name>`` header; TensorBoard an event file.

zero never configures logging: it installs no handler and sets no level on its loggers,
so the line shows where the application's logging sends INFO records of ``"zero_all"``
(``logging.basicConfig(level=logging.INFO)``); ``zero run`` and ``zero ckpt`` configure
it for the programs they run.

On a terminal, rank 0 also keeps a one-line progress bar on stderr between those lines
(steps done, of ``total_num_steps`` when the LR schedule has one, steps/s and the time
left). It is drawn only when stderr is a terminal, so logs and CI output get no carriage
returns; ``"progress_bar": false`` in the config or ``ZERO_PROGRESS=0`` in the environment
turn it off. It ends on a newline at the schedule's last step, and is erased when the
engine is destroyed or the process exits, so no half-drawn line is left behind.

The numbers every rank contributes (loss, tokens, memory) travel in one small
all-reduce at an optimizer step that reports, so every rank takes part in it.
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import logging
import os
import resource
import sys
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from zero_comm import Communicator

from .._config import ConfigError, DeepSpeedConfig

__all__ = ["TrainingMonitor"]

logger = logging.getLogger("zero_all")

PHASES = ("forward", "backward", "step")


def progress_wanted(config: DeepSpeedConfig, rank: int, stream: Any = None) -> bool:
    """Rank 0 draws the bar when the config and ``ZERO_PROGRESS`` allow it and ``stream`` is a terminal."""
    if rank != 0 or not config.progress_bar:
        return False
    if os.environ.get("ZERO_PROGRESS", "1").strip().lower() in ("0", "false", "off", "no"):
        return False
    stream = stream if stream is not None else sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB


def _listed(values: list[float], form: str) -> str:
    """``[a,b]``: one field of a line whose fields are split by spaces."""
    return "[" + ",".join(form.format(v) for v in values) + "]"


class _CSVWriter:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def write(self, name: str, value: float, step: int) -> None:
        path = self.directory / (name.replace("/", "_").replace(" ", "_") + ".csv")
        new = not path.exists() or path.stat().st_size == 0
        with path.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", name.rsplit("/", 1)[-1]])
            writer.writerow([step, value])

    def flush(self) -> None:
        pass


class _TensorBoardWriter:
    def __init__(self, directory: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("tensorboard.enabled: install tensorboard (pip install 'zero-all[tensorboard]') "
                              "or set it to false") from None
        self.writer = SummaryWriter(log_dir=str(directory))

    def write(self, name: str, value: float, step: int) -> None:
        self.writer.add_scalar(name, value, step)

    def flush(self) -> None:
        self.writer.flush()


class ProgressBar:
    """``step 120/500 [######-------------] 4.1 steps/s, 1m33s left`` redrawn in place on a terminal."""

    WIDTH = 24

    def __init__(self, stream: Any = None, total: int | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.total = total
        self.started = time.perf_counter()
        self.first: int | None = None
        self.drawn = False

    def update(self, step: int) -> None:
        self.first = step - 1 if self.first is None else self.first
        rate = (step - self.first) / max(time.perf_counter() - self.started, 1e-9)
        text = f"step {step}"
        if self.total:
            done = min(step / self.total, 1.0)
            filled = round(done * self.WIDTH)
            text += f"/{self.total} [{'#' * filled}{'-' * (self.WIDTH - filled)}]"
        text += f" {rate:.3g} steps/s"
        if self.total and rate > 0 and step < self.total:
            left = int((self.total - step) / rate)
            text += f", {left // 60}m{left % 60:02d}s left"
        finished = self.total is not None and step >= self.total
        self.stream.write("\r\x1b[K" + text + ("\n" if finished else ""))  # the last step's bar stays
        self.stream.flush()
        self.drawn = not finished

    def clear(self) -> None:
        """Wipe the bar before a log line is written under it, and at the end of the run."""
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.drawn = False


def _clear_at_exit(bar: weakref.ref[ProgressBar]) -> None:
    alive = bar()
    if alive is not None:
        with contextlib.suppress(Exception):  # the stream may already be closed
            alive.clear()


class TrainingMonitor:
    """Collects what the engine does between reports and reports it (see the module docstring)."""

    def __init__(self, config: DeepSpeedConfig, comm: Communicator, device: torch.device) -> None:
        self.comm, self.device = comm, device
        self.every = int(config.steps_per_print or 0)
        self.wall_clock = config.wall_clock_breakdown
        self.fp16 = config.fp16.enabled is True
        blocks = [(b, w) for b, w in ((config.csv_monitor, _CSVWriter), (config.tensorboard, _TensorBoardWriter))
                  if b.enabled]
        self.writing = bool(blocks)  # the same on every rank: whether each step's events are gathered
        self.writers = [w(Path(b.output_path) / b.job_name) for b, w in blocks] if comm.rank == 0 else []
        self.times = dict.fromkeys(PHASES, 0.0)
        self._loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self._loss_count = 0
        self._tokens = 0
        self._since_print = time.perf_counter()
        self._steps_since_print = 0
        self.progress: ProgressBar | None = None
        if progress_wanted(config, comm.rank):
            total = config.scheduler.params.get("total_num_steps") if config.scheduler is not None else None
            self.progress = ProgressBar(total=total if isinstance(total, int) else None)
            atexit.register(_clear_at_exit, weakref.ref(self.progress))

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Time a forward, backward or step (with ``wall_clock_breakdown`` only)."""
        if not self.wall_clock:
            yield
            return
        self._sync()
        began = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.times[phase] += time.perf_counter() - began

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def saw_loss(self, loss: torch.Tensor) -> None:
        """A micro-batch's loss as given to ``backward`` (kept on its device; no sync)."""
        self._loss_sum += loss.detach().to(self._loss_sum.device, torch.float64).sum()
        self._loss_count += 1

    def saw_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Count tokens when the model is fed token ids (an integer tensor of at least two dims)."""
        first = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(first, torch.Tensor) and first.dim() >= 2 and not first.is_floating_point():
            self._tokens += first.numel()

    def after_step(self, *, step: int, samples: int, batch: int, lrs: list[float], loss_scale: float,
                   skipped: int) -> None:
        """At every accumulation boundary, on every rank, after the optimizer and scheduler stepped.

        ``step`` counts optimizer steps, ``samples`` the samples trained so far, ``batch`` per step."""
        self._steps_since_print += 1
        printing = self.every > 0 and step % self.every == 0
        if self.progress is not None:
            self.progress.update(step)
        if not (printing or self.writing):
            self._reset_window()
            return
        world, rank = self.comm.world_size, self.comm.rank
        shared = torch.zeros(3 + world, dtype=torch.float64, device=self.device)
        shared[0] = self._loss_sum.to(self.device)
        shared[1], shared[2] = self._loss_count, self._tokens
        if printing:
            shared[3 + rank] = _peak_memory_bytes(self.device)
        if world > 1:
            self.comm.all_reduce(shared)
        values = shared.tolist()
        loss = values[0] / values[1] if values[1] else None
        self._reset_window()
        events: list[tuple[str, float]] = [("Train/Samples/lr", lrs[0])]
        if loss is not None:
            events.insert(0, ("Train/Samples/train_loss", loss))
        if self.fp16:
            events.append(("Train/Samples/loss_scale", loss_scale))
        if printing and self.wall_clock:
            events += [(f"Train/Samples/elapsed_time_ms_{p}", self.times[p] * 1e3) for p in PHASES]
        for writer in self.writers:
            for name, value in events:
                writer.write(name, value, samples)
        if not printing:
            return
        if rank == 0:
            if self.progress is not None:
                self.progress.clear()
            logger.info(self._line(step, skipped, loss, lrs, loss_scale, batch, values[2], values[3:]))
        for writer in self.writers:
            writer.flush()
        self.times = dict.fromkeys(PHASES, 0.0)
        self._since_print = time.perf_counter()
        self._steps_since_print = 0
        self._tokens = 0

    def close(self) -> None:
        """Erase the progress bar (the engine's ``destroy``)."""
        if self.progress is not None:
            self.progress.clear()

    def _reset_window(self) -> None:
        """The loss is per optimizer step: cleared at every boundary (tokens count per print interval)."""
        self._loss_sum.zero_()
        self._loss_count = 0

    def _line(self, step: int, skipped: int, loss: float | None, lrs: list[float], loss_scale: float, batch: int,
              tokens: float, memory: list[float]) -> str:
        elapsed = max(time.perf_counter() - self._since_print, 1e-9)
        parts = [f"step={step}", f"skipped={skipped}"]
        if loss is not None:
            parts.append(f"loss={loss:.6g}")
        parts += [f"lr={_listed(lrs, '{:.6g}')}", f"loss_scale={loss_scale:g}",
                  f"samples/s={self._steps_since_print * batch / elapsed:.4g}"]
        if tokens:
            parts.append(f"tokens/s={tokens / elapsed:.4g}")  # all ranks' tokens since the last line
        label = "max_allocated_mib" if self.device.type == "cuda" else "peak_rss_mib"
        parts.append(f"{label}={_listed([m / 2**20 for m in memory], '{:.0f}')}")
        if self.wall_clock:
            parts += [f"{p}_ms={self.times[p] * 1e3:.4g}" for p in PHASES]
        return " ".join(parts)
