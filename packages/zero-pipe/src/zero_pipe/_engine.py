"""PipelineEngine: the one interpreter that runs any schedule on this rank's stage.

``train_batch`` pulls ``micro_batches`` micro-batches, walks this rank's
instruction list of the training schedule (forward, backward, sends and receives
through a :class:`~zero_pipe._transport.Transport`), sums the gradients of tied
layers across the stages that hold them, averages gradients across the
data-parallel group if one is given, and steps the optimizer -- DeepSpeed's
``PipelineEngine.train_batch``. The loss of each micro-batch is scaled by
``1 / micro_batches`` before its backward, so the gradients are those of the mean
loss, as if the whole batch went through one model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from zero_comm import Communicator, all_reduce_coalesced

from ._errors import PipelineError
from ._module import PipelineModule, Segment
from ._schedule import COMPUTE, Action, Op, Schedule
from ._schedules import make_schedule
from ._simulate import message_key, simulate
from ._tied import reduce_tied_grads, sync_tied_weights
from ._transport import MessageKey, Transport, spec

__all__ = ["BatchTiming", "Optimizer", "PipelineEngine"]

Batch = tuple[Any, Any]  # (inputs, labels)


class Optimizer(Protocol):
    """What the engine needs from an optimizer: a torch optimizer, or anything that steps and zeroes."""

    def step(self) -> Any: ...
    def zero_grad(self) -> Any: ...


@dataclass
class BatchTiming:
    """Where this rank's time in the last batch went (seconds).

    ``compute`` is forward plus backward; ``pipeline`` runs from the start of the
    batch to the end of this rank's last forward or backward, so ``pipeline - compute``
    is time spent waiting on other stages and sending; ``wall`` adds the batch-wide
    tail (tied and data-parallel reductions, the step, the loss broadcast). The
    pipeline's measured bubble is ``1 - sum(compute) / (ranks * max(pipeline))``.
    """

    wall: float = 0.0
    pipeline: float = 0.0
    compute: float = 0.0


@dataclass
class _Batch:
    inputs: dict[int, Any] = field(default_factory=dict)
    labels: dict[int, Any] = field(default_factory=dict)
    received: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    saved: dict[tuple[int, int], tuple[Any, Any]] = field(default_factory=dict)  # (input, output or loss)
    segments: dict[tuple[int, int], list[Segment]] = field(default_factory=dict)  # zero-bubble: per-layer graph
    output_grads: dict[tuple[int, int], list[Any]] = field(default_factory=dict)  # zero-bubble: for the weights
    input_grads: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    losses: list[torch.Tensor] = field(default_factory=list)
    loaded: int = 0


class PipelineEngine:
    """Train and evaluate a :class:`PipelineModule` over a pipeline group.

    Args:
        module: this rank's stage; ``module.stage_id`` must be this rank in ``comm``.
        comm: the pipeline-parallel group (one rank per stage).
        micro_batches: micro-batches per batch (DeepSpeed's gradient accumulation steps).
        schedule: "gpipe", "1f1b" or "interleaved" (needs ``module.chunks >= 2``), or a
            function ``(stages, micro_batches, *, train) -> Schedule``.
        optimizer: stepped and zeroed at the end of :meth:`train_batch`; ``None``
            leaves the gradients in ``.grad`` for the caller.
        dp_comm: the data-parallel group; gradients are averaged across it before the
            step. Leave it ``None`` when the optimizer reduces gradients itself (a
            ZeRO optimizer over the data-parallel group).
        dynamic_shapes: by default the first batch fixes the shape of every
            activation and gradient between stages, and a later one that differs is
            an error raised by the stage that would send it (as in DeepSpeed); the
            fixed sizes let receives be posted ahead of time. ``True`` allows shapes
            to change from batch to batch, for one extra round trip per message.
        loss_scale: fp16's loss scaling: the last stage multiplies each loss by
            ``loss_scale()`` before its backward, so every stage's gradients are scaled
            by it (the optimizer unscales them and moves the scale); ``None``: 1.
    """

    def __init__(self, module: PipelineModule, comm: Communicator, *, micro_batches: int,
                 schedule: str | Callable[..., Schedule] = "1f1b", optimizer: Optimizer | None = None,
                 dp_comm: Communicator | None = None, dynamic_shapes: bool = False,
                 loss_scale: Callable[[], float] | None = None):
        if comm.world_size != module.num_stages or comm.rank != module.stage_id:
            raise ValueError(f"the module is stage {module.stage_id} of {module.num_stages} but this rank is "
                             f"{comm.rank} of a pipeline group of {comm.world_size}")
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
        self.module, self.comm, self.micro_batches = module, comm, micro_batches
        self.optimizer, self.dp_comm, self.dynamic_shapes = optimizer, dp_comm, dynamic_shapes
        self.loss_scale = loss_scale
        self.train_schedule = self._schedule(schedule, train=True)
        self.eval_schedule = self._schedule(schedule, train=False)
        # per schedule (keyed by train): the peer of the next receive after each step; the messages in and out
        self._plans = {s.train: (self._sources(s), *self._messages(s))
                       for s in (self.train_schedule, self.eval_schedule)}
        self.transport = Transport(comm, static_shapes=not dynamic_shapes)
        self._split = any(a.op == Op.BACKWARD_INPUT for a in self.train_schedule.actions[comm.rank])
        if self._split and module.activation_checkpoint_interval:
            raise ValueError("a zero-bubble schedule splits each backward in two and cannot recompute "
                             "checkpointed layers for each half; use activation_checkpoint_interval=0")
        self._compute = {Op.FORWARD: self._forward, Op.BACKWARD: self._backward,
                         Op.BACKWARD_INPUT: self._backward_input, Op.BACKWARD_WEIGHT: self._backward_weight}
        self.timing = BatchTiming()
        self._run_guarded(lambda: sync_tied_weights(module, self.transport))

    def _schedule(self, schedule: str | Callable[..., Schedule], *, train: bool) -> Schedule:
        p, v = self.module.num_stages, self.module.chunks
        if isinstance(schedule, str):
            if (schedule == "interleaved") != (v > 1):
                raise ValueError(f"the {schedule} schedule needs a module with "
                                 f"{'several model chunks (chunks >= 2)' if schedule == 'interleaved' else 'one chunk'}"
                                 f"; this one has chunks={v}")
            made = make_schedule(schedule, p, self.micro_batches, chunks=v, train=train)
        else:
            made = schedule(p, self.micro_batches, train=train)
        if (made.stages, made.micro_batches, made.chunks) != (p, self.micro_batches, v):
            raise ValueError(f"the schedule is for {made.stages} stages x {made.chunks} chunks and "
                             f"{made.micro_batches} micro-batches; the engine has {p} x {v} and {self.micro_batches}")
        simulate(made)  # a schedule that cannot finish fails here, not as a hang
        return made

    # -- public API --------------------------------------------------------------------------
    def train_batch(self, data_iter: Iterable[Batch] | None = None, *, batch: Batch | None = None) -> float:
        """Forward and backward ``micro_batches`` micro-batches, then step; return their mean loss.

        Data comes from ``data_iter`` (one ``(inputs, labels)`` micro-batch per item)
        or from ``batch``, split into ``micro_batches`` equal parts along dimension 0.
        Only the first and last stage read data; the others may pass nothing.
        """
        self.module.train()
        return self._run_guarded(lambda: self._run(self.train_schedule, self._micro_batches(data_iter, batch)))

    def eval_batch(self, data_iter: Iterable[Batch] | None = None, *, batch: Batch | None = None) -> float:
        """Forward only, without gradients; return the mean loss of ``micro_batches`` micro-batches."""
        self.module.eval()
        with torch.no_grad():
            return self._run_guarded(lambda: self._run(self.eval_schedule, self._micro_batches(data_iter, batch)))

    # -- running -------------------------------------------------------------------------------
    def _run_guarded(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except BaseException:  # a stage that was itself aborted passes it on: its peers may wait on it
            self.transport.abort([r for r in range(self.comm.world_size) if r != self.comm.rank])
            raise

    def _micro_batches(self, data_iter: Iterable[Batch] | None, batch: Batch | None) -> Iterator[Batch] | None:
        if batch is None:
            return iter(data_iter) if data_iter is not None else None
        if data_iter is not None:
            raise ValueError("pass data_iter or batch, not both")
        m = self.micro_batches
        parts: list[Sequence[Any]] = []
        for name, t in zip(("inputs", "labels"), batch):
            if isinstance(t, torch.Tensor):
                if t.shape[0] % m:
                    raise ValueError(f"a batch of {t.shape[0]} ({name}) cannot be split into {m} equal "
                                     f"micro-batches; use a batch size divisible by {m}")
                parts.append(t.chunk(m))
            else:
                parts.append([t] * m)
        return iter(list(zip(*parts)))

    def _run(self, schedule: Schedule, data: Iterator[Batch] | None) -> float:
        start = last_compute = time.perf_counter()
        compute = 0.0
        state = _Batch()
        sources, incoming, outgoing = self._plans[schedule.train]
        self.transport.expect(incoming, outgoing)
        for i, action in enumerate(schedule.actions[self.comm.rank]):
            if action.op in COMPUTE:
                src = sources[i]
                if src is not None:
                    self.transport.prefetch(src)
                t0 = time.perf_counter()
                self._compute[action.op](schedule, action, state)
                last_compute = time.perf_counter()
                compute += last_compute - t0
            else:
                self._other(schedule, action, state, data)
        self.transport.flush()
        loss = self._mean_loss(schedule, state)
        self.timing = BatchTiming(time.perf_counter() - start, last_compute - start, compute)
        return loss

    def _sources(self, schedule: Schedule) -> list[int | None]:
        """For each of this rank's instructions, the peer of the next receive at or after it (None: no more)."""
        rank, out = self.comm.rank, []
        following: int | None = None
        for a in reversed(schedule.actions[rank]):
            vs = schedule.virtual_stage(rank, a.chunk)
            if a.op in (Op.RECV_ACT, Op.RECV_GRAD):
                following = schedule.place(vs - 1 if a.op == Op.RECV_ACT else vs + 1)[0]
            out.append(following)
        return out[::-1]

    def _messages(self, schedule: Schedule) -> tuple[dict[int, list[MessageKey]], dict[int, list[MessageKey]]]:
        """Per peer, the messages it sends this rank and this rank sends it, in sending order (read off
        the schedules of both)."""
        incoming: dict[int, list[MessageKey]] = {}
        outgoing: dict[int, list[MessageKey]] = {}
        for src, actions in enumerate(schedule.actions):
            for a in actions:
                if a.op in (Op.SEND_ACT, Op.SEND_GRAD):
                    key = message_key(schedule, src, a)
                    dst = schedule.place(key[2])[0]
                    if dst == self.comm.rank:
                        incoming.setdefault(src, []).append(key)
                    if src == self.comm.rank:
                        outgoing.setdefault(dst, []).append(key)
        return incoming, outgoing

    def _other(self, schedule: Schedule, a: Action, state: _Batch, data: Iterator[Batch] | None) -> None:
        rank = self.comm.rank
        if a.op == Op.LOAD:
            if data is None:
                raise ValueError(f"stage {rank} reads data but was given no data_iter or batch")
            try:
                state.inputs[a.micro_batch], state.labels[a.micro_batch] = next(data)
            except StopIteration:
                raise ValueError(f"the data iterator ran out after {state.loaded} micro-batches; a batch needs "
                                 f"{schedule.micro_batches}") from None
            state.loaded += 1
        elif a.op == Op.RECV_ACT:
            vs = schedule.virtual_stage(rank, a.chunk)
            t = self.transport.recv(message_key(schedule, rank, a), schedule.place(vs - 1)[0],
                                    what=f"the activation of micro-batch {a.micro_batch} into "
                                         f"{self._where(a.chunk)}")
            if schedule.train and t.is_floating_point():
                t.requires_grad_(True)
            state.received[(a.micro_batch, a.chunk)] = t
        elif a.op == Op.SEND_ACT:
            vs = schedule.virtual_stage(rank, a.chunk)
            out = state.saved[(a.micro_batch, a.chunk)][1]
            if not schedule.train:
                del state.saved[(a.micro_batch, a.chunk)]
            self.transport.send(message_key(schedule, rank, a), out, schedule.place(vs + 1)[0])
        elif a.op == Op.RECV_GRAD:
            vs = schedule.virtual_stage(rank, a.chunk)
            out = state.saved[(a.micro_batch, a.chunk)][1]
            state.received[(a.micro_batch, -1 - a.chunk)] = self.transport.recv(
                message_key(schedule, rank, a), schedule.place(vs + 1)[0], expect=(out.shape, out.dtype),
                what=f"the gradient of micro-batch {a.micro_batch}'s output of {self._where(a.chunk)}")
        elif a.op == Op.SEND_GRAD:
            vs = schedule.virtual_stage(rank, a.chunk)
            grad = state.input_grads.pop((a.micro_batch, a.chunk))
            self.transport.send(message_key(schedule, rank, a), grad, schedule.place(vs - 1)[0])
        elif a.op == Op.REDUCE_TIED:
            reduce_tied_grads(self.module, self.transport)
        elif a.op == Op.REDUCE_GRADS:
            if self.dp_comm is not None and self.dp_comm.world_size > 1:
                grads = [p.grad for p in self.module.parameters() if p.grad is not None]
                if grads:
                    all_reduce_coalesced(self.dp_comm, grads, "avg")
        elif a.op == Op.STEP:
            if self.optimizer is not None:
                self.optimizer.step()
                self.optimizer.zero_grad()
        else:  # pragma: no cover - every Op is handled above
            raise PipelineError(f"stage {rank} cannot run {a}")

    def _forward(self, schedule: Schedule, a: Action, state: _Batch) -> None:
        vs = schedule.virtual_stage(self.comm.rank, a.chunk)
        unit = (a.micro_batch, a.chunk)
        x = state.inputs[a.micro_batch] if vs == 0 else state.received.pop(unit)
        segments: list[Segment] | None = [] if self._split and schedule.train else None
        try:
            out = self.module.forward_chunk(a.chunk, x, segments)
        except Exception as exc:
            got = spec(x) if isinstance(x, torch.Tensor) else type(x).__name__
            source = "its input" if vs == 0 else f"the activation from stage {schedule.place(vs - 1)[0]}"
            raise PipelineError(f"{self._where(a.chunk)} failed in the forward of micro-batch {a.micro_batch} on "
                                f"{source} ({got}): {exc}") from exc
        if vs == schedule.virtual_stages - 1:
            if self.module.loss_fn is None:
                raise PipelineError("the last stage needs a loss_fn (PipelineModule(..., loss_fn=...)) to train "
                                    "or evaluate")
            out = self.module.loss_fn(out, state.labels.pop(a.micro_batch))
            state.losses.append(out.detach())
            if segments:
                segments[-1].output = out  # the loss belongs to the last layer's piece of the graph
            state.inputs.pop(a.micro_batch, None)
        elif not isinstance(out, torch.Tensor):
            raise PipelineError(f"{self._where(a.chunk)} returned a {type(out).__name__}; a stage passes exactly "
                                "one tensor to the next")
        if vs == 0:
            state.inputs.pop(a.micro_batch, None)
        if schedule.train or vs < schedule.virtual_stages - 1:
            state.saved[unit] = (x, out)
        if segments is not None:
            state.segments[unit] = segments

    def _backward(self, schedule: Schedule, a: Action, state: _Batch) -> None:
        vs = schedule.virtual_stage(self.comm.rank, a.chunk)
        x, out = state.saved.pop((a.micro_batch, a.chunk))
        if vs == schedule.virtual_stages - 1:
            scale = self.loss_scale() if self.loss_scale is not None else 1.0
            torch.autograd.backward(out / schedule.micro_batches if scale == 1.0 else
                                    out * scale / schedule.micro_batches)
        else:
            torch.autograd.backward(out, state.received.pop((a.micro_batch, -1 - a.chunk)))
        if vs > 0:
            if x.grad is None:
                raise PipelineError(f"{self._where(a.chunk)}'s input got no gradient in micro-batch "
                                    f"{a.micro_batch}: its output does not depend on it")
            state.input_grads[(a.micro_batch, a.chunk)] = x.grad

    def _loss_factor(self, schedule: Schedule) -> float:
        """What the last stage multiplies each micro-batch's loss by before its backward."""
        return (self.loss_scale() if self.loss_scale is not None else 1.0) / schedule.micro_batches

    def _backward_input(self, schedule: Schedule, a: Action, state: _Batch) -> None:
        """Zero-bubble, first half: the gradient of the chunk's input only, layer by layer from the end;
        each layer's output gradient is kept for :meth:`_backward_weight`."""
        vs = schedule.virtual_stage(self.comm.rank, a.chunk)
        unit = (a.micro_batch, a.chunk)
        segments = state.segments[unit]
        out = state.saved.pop(unit)[1]
        last = vs == schedule.virtual_stages - 1  # then ``out`` is the loss, which is scaled by 1 / m
        grad = (torch.full_like(out, self._loss_factor(schedule)) if last else
                state.received.pop((a.micro_batch, -1 - a.chunk)))
        grads: list[Any] = []
        for k in range(len(segments) - 1, -1, -1):
            grads.append(grad)
            if k == 0 and vs == 0:
                break  # the model's input needs no gradient
            (grad,) = torch.autograd.grad(segments[k].output, segments[k].input, grad, retain_graph=True)
        state.output_grads[unit] = grads[::-1]
        if vs > 0:
            state.input_grads[unit] = grad

    def _backward_weight(self, schedule: Schedule, a: Action, state: _Batch) -> None:
        """Zero-bubble, second half: every layer's parameter gradients from its kept output gradient."""
        unit = (a.micro_batch, a.chunk)
        for seg, grad in zip(state.segments.pop(unit), state.output_grads.pop(unit)):
            if seg.params:
                torch.autograd.backward(seg.output, grad, inputs=seg.params)

    def _mean_loss(self, schedule: Schedule, state: _Batch) -> float:
        last = schedule.place(schedule.virtual_stages - 1)[0]
        loss = torch.zeros((), dtype=torch.float64)
        if self.comm.rank == last:
            loss += torch.stack([t.double() for t in state.losses]).mean()
        if self.comm.world_size > 1:
            self.comm.broadcast(loss, last)
        if self.dp_comm is not None and self.dp_comm.world_size > 1:
            self.dp_comm.all_reduce(loss, "avg")
        return float(loss)

    def _where(self, chunk: int) -> str:
        text = self.module.describe_stage()
        return text if self.module.chunks == 1 else f"{text}, chunk {chunk}"
