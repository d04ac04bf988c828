"""The errors a pipeline raises."""

from __future__ import annotations

from zero_comm import CommError

__all__ = ["PipelineAborted", "PipelineError"]


class PipelineError(RuntimeError):
    """A pipeline stage could not go on: names the stage, the micro-batch and what was wrong."""


class PipelineAborted(PipelineError, CommError):
    """Another stage failed and told this one to stop; that stage's error is the one to read.

    It is also a :class:`zero_comm.CommError`, so harnesses that rank failures (``run_ranks``)
    report the stage that failed first as the cause."""
