"""A pipeline schedule as data: for every stage, the ordered list of what it does.

A schedule is produced by a pure function (see ``_schedules``), checked without
processes by :func:`~zero_pipe.simulate`, and run by one interpreter
(:class:`~zero_pipe.PipelineEngine`). Keeping the three apart means a new schedule
is a new function of a few lines, and whether it completes is a unit test, not a
hang on a cluster.

Model chunks and virtual stages: with ``chunks`` model chunks per rank (interleaved
1F1B), the model is cut into ``stages * chunks`` consecutive pieces; rank ``r``
holds pieces ``r, r + stages, r + 2 * stages, ...`` and chunk ``c`` of rank ``r``
is virtual stage ``c * stages + r``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

__all__ = ["Action", "Op", "Schedule"]


class Op(str, Enum):
    """What one instruction does."""

    LOAD = "load"  # take micro-batch ``micro_batch`` from the data iterator
    RECV_ACT = "recv_act"  # receive the input activation of (micro_batch, chunk) from the previous stage
    FORWARD = "forward"
    SEND_ACT = "send_act"  # send the output activation of (micro_batch, chunk) to the next stage
    RECV_GRAD = "recv_grad"  # receive the gradient of (micro_batch, chunk)'s output from the next stage
    BACKWARD = "backward"
    BACKWARD_INPUT = "backward_input"  # zero-bubble: only the gradient of the input (on the critical path)
    BACKWARD_WEIGHT = "backward_weight"  # zero-bubble: the parameters' gradients, deferred to fill idle time
    SEND_GRAD = "send_grad"  # send the gradient of (micro_batch, chunk)'s input to the previous stage
    REDUCE_TIED = "reduce_tied"  # sum the gradients of tied layers across the stages holding them
    REDUCE_GRADS = "reduce_grads"  # average gradients across the data-parallel group
    STEP = "step"  # optimizer step, then zero the gradients


COMPUTE = (Op.FORWARD, Op.BACKWARD, Op.BACKWARD_INPUT, Op.BACKWARD_WEIGHT)
RECEIVES = (Op.RECV_ACT, Op.RECV_GRAD)
SENDS = (Op.SEND_ACT, Op.SEND_GRAD)


@dataclass(frozen=True)
class Action:
    """One instruction of one stage. ``micro_batch`` is -1 for batch-wide ops."""

    op: Op
    micro_batch: int = -1
    chunk: int = 0

    def __str__(self) -> str:
        if self.micro_batch < 0:
            return self.op.value
        return f"{self.op.value}(mb={self.micro_batch}, chunk={self.chunk})"


@dataclass(frozen=True)
class Schedule:
    """Per-stage instruction lists of one batch.

    Attributes:
        name: the schedule's name ("gpipe", "1f1b", "interleaved").
        stages: number of pipeline ranks. micro_batches: micro-batches per batch.
        chunks: model chunks per rank (1 except for interleaved schedules).
        train: True if the schedule runs backward and the optimizer step.
        actions: ``actions[rank]`` is that rank's ordered instructions.
    """

    name: str
    stages: int
    micro_batches: int
    chunks: int
    train: bool
    actions: tuple[tuple[Action, ...], ...]

    @property
    def virtual_stages(self) -> int:
        return self.stages * self.chunks

    def virtual_stage(self, rank: int, chunk: int) -> int:
        return chunk * self.stages + rank

    def place(self, virtual_stage: int) -> tuple[int, int]:
        """``(rank, chunk)`` of a virtual stage."""
        return virtual_stage % self.stages, virtual_stage // self.stages

    def describe(self, rank: int) -> str:
        """One rank's instructions, one per line, for error messages and docs."""
        return "\n".join(str(a) for a in self.actions[rank])
