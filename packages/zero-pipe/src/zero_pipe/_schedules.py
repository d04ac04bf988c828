"""The schedules: pure functions from (stages, micro-batches) to per-stage instructions.

Each schedule only decides the *order of compute* on every rank (which forward or
backward of which micro-batch and chunk comes next); :func:`_lower` then adds the
data loads, the receives before and the sends after each compute, and the
batch-wide tail (tied-gradient reduction, data-parallel reduction, step). Sends are
asynchronous and receives block, so a schedule deadlocks only if some rank waits
for a message that is never sent before it -- which :func:`~zero_pipe.simulate`
checks.

- GPipe: all forwards, then all backwards. Simple; holds every micro-batch's
  activations until the backward phase.
- 1F1B (PipeDream-Flush, DeepSpeed's ``TrainSchedule``): stage ``s`` runs
  ``p - s - 1`` warm-up forwards, then alternates one forward and one backward.
  Same bubble as GPipe, at most ``p - s`` micro-batches of activations held.
- Interleaved 1F1B (Megatron-LM): ``chunks`` model chunks per rank; the bubble
  shrinks by the number of chunks, for more point-to-point traffic. Micro-batches
  go through in groups of ``stages``, so ``micro_batches`` must be a multiple of
  ``stages``.
"""

from __future__ import annotations

from collections.abc import Callable

from ._schedule import Action, Op, Schedule

__all__ = ["SCHEDULES", "gpipe", "interleaved_1f1b", "make_schedule", "one_f_one_b", "zb_h1"]

Compute = tuple[Op, int, int]  # (FORWARD | BACKWARD, micro_batch, chunk)


def _check(stages: int, micro_batches: int, chunks: int) -> None:
    for name, value in (("stages", stages), ("micro_batches", micro_batches), ("chunks", chunks)):
        if value < 1:
            raise ValueError(f"a pipeline schedule needs {name} >= 1, got {value}")


def gpipe(stages: int, micro_batches: int, *, train: bool = True) -> Schedule:
    """GPipe: every forward, then every backward, on every stage."""
    _check(stages, micro_batches, 1)
    orders = []
    for _ in range(stages):
        order: list[Compute] = [(Op.FORWARD, mb, 0) for mb in range(micro_batches)]
        if train:
            order += [(Op.BACKWARD, mb, 0) for mb in range(micro_batches)]
        orders.append(order)
    return _lower("gpipe", stages, micro_batches, 1, train, orders)


def one_f_one_b(stages: int, micro_batches: int, *, train: bool = True) -> Schedule:
    """1F1B: warm-up forwards, alternate one forward and one backward, cool-down backwards."""
    _check(stages, micro_batches, 1)
    orders = []
    for s in range(stages):
        if not train:
            orders.append([(Op.FORWARD, mb, 0) for mb in range(micro_batches)])
            continue
        warmup = min(stages - s - 1, micro_batches)
        order: list[Compute] = [(Op.FORWARD, mb, 0) for mb in range(warmup)]
        for i in range(micro_batches - warmup):
            order += [(Op.FORWARD, warmup + i, 0), (Op.BACKWARD, i, 0)]
        order += [(Op.BACKWARD, mb, 0) for mb in range(micro_batches - warmup, micro_batches)]
        orders.append(order)
    return _lower("1f1b", stages, micro_batches, 1, train, orders)


def interleaved_1f1b(stages: int, micro_batches: int, chunks: int = 2, *, train: bool = True) -> Schedule:
    """Interleaved 1F1B over ``chunks`` model chunks per rank (Megatron-LM's order).

    The k-th forward of a rank runs chunk ``(k // stages) % chunks`` of micro-batch
    ``(k // (stages * chunks)) * stages + k % stages``; backwards walk the chunks in
    reverse. Rank ``r`` warms up with ``2 * (stages - r - 1) + (chunks - 1) * stages``
    forwards, then alternates.
    """
    _check(stages, micro_batches, chunks)
    if micro_batches % stages:
        raise ValueError(f"interleaved 1F1B runs micro-batches in groups of the {stages} stages, so the "
                         f"number of micro-batches must be a multiple of {stages}; got {micro_batches}")
    total = micro_batches * chunks

    def unit(k: int, backward: bool) -> tuple[int, int]:
        chunk = (k // stages) % chunks
        return (k // (stages * chunks)) * stages + k % stages, (chunks - 1 - chunk if backward else chunk)

    orders = []
    for r in range(stages):
        if not train:
            orders.append([(Op.FORWARD, *unit(k, False)) for k in range(total)])
            continue
        warmup = min(2 * (stages - r - 1) + (chunks - 1) * stages, total)
        order: list[Compute] = [(Op.FORWARD, *unit(k, False)) for k in range(warmup)]
        for i in range(total - warmup):
            order += [(Op.FORWARD, *unit(warmup + i, False)), (Op.BACKWARD, *unit(i, True))]
        order += [(Op.BACKWARD, *unit(k, True)) for k in range(total - warmup, total)]
        orders.append(order)
    return _lower("interleaved", stages, micro_batches, chunks, train, orders)


def zb_h1(stages: int, micro_batches: int, *, train: bool = True) -> Schedule:
    """ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism", 2023): 1F1B with each backward split.

    The input's gradient (``BACKWARD_INPUT``) stays where 1F1B's backward was: it is what
    the previous stage waits for, and without the weights' half it reaches stage 0
    sooner. The weights' gradients (``BACKWARD_WEIGHT``) wait: stage ``s`` keeps ``s``
    of them pending through the steady state (the later the stage, the earlier its
    gradients are ready, the more it defers), runs one after each input gradient in
    the cool-down and the rest at the end, where 1F1B idles. With the three parts of
    equal cost the bubble drops from 1F1B's ``(p - 1) * 3`` units per stage to
    ``(p - 1)``, and every stage holds at most ``p`` micro-batches of activations
    (1F1B's stage 0), as the paper states.
    """
    _check(stages, micro_batches, 1)
    if not train:
        return one_f_one_b(stages, micro_batches, train=False)
    orders = []
    for s in range(stages):
        warmup = min(stages - s - 1, micro_batches)
        order: list[Compute] = [(Op.FORWARD, mb, 0) for mb in range(warmup)]
        pending: list[int] = []
        for i in range(micro_batches - warmup):
            order += [(Op.FORWARD, warmup + i, 0), (Op.BACKWARD_INPUT, i, 0)]
            pending.append(i)
            if len(pending) > s:
                order.append((Op.BACKWARD_WEIGHT, pending.pop(0), 0))
        for mb in range(micro_batches - warmup, micro_batches):
            order += [(Op.BACKWARD_INPUT, mb, 0), (Op.BACKWARD_WEIGHT, pending.pop(0) if pending else mb, 0)]
            if order[-1][1] != mb:
                pending.append(mb)
        order += [(Op.BACKWARD_WEIGHT, mb, 0) for mb in pending]
        orders.append(order)
    return _lower("zb-h1", stages, micro_batches, 1, train, orders)


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "interleaved": interleaved_1f1b,
    "zb-h1": zb_h1,
}


def make_schedule(name: str, stages: int, micro_batches: int, *, chunks: int = 1, train: bool = True) -> Schedule:
    """The schedule called ``name`` ("gpipe", "1f1b", "interleaved" or "zb-h1")."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {name!r}; expected one of {', '.join(SCHEDULES)}")
    if name == "interleaved":
        return interleaved_1f1b(stages, micro_batches, chunks, train=train)
    if chunks != 1:
        raise ValueError(f"the {name} schedule runs one model chunk per stage; got chunks={chunks} "
                         "(use the interleaved schedule for several)")
    return SCHEDULES[name](stages, micro_batches, train=train)


def _lower(name: str, stages: int, micro_batches: int, chunks: int, train: bool,
           orders: list[list[Compute]]) -> Schedule:
    """Add loads, receives, sends and the batch-wide tail around each rank's compute order."""
    last = stages * chunks - 1
    actions = []
    for rank, order in enumerate(orders):
        out: list[Action] = []
        loaded: set[int] = set()
        for op, mb, chunk in order:
            vs = chunk * stages + rank
            if op == Op.FORWARD:
                if vs in (0, last) and mb not in loaded:
                    out.append(Action(Op.LOAD, mb))
                    loaded.add(mb)
                if vs > 0:
                    out.append(Action(Op.RECV_ACT, mb, chunk))
                out.append(Action(Op.FORWARD, mb, chunk))
                if vs < last:
                    out.append(Action(Op.SEND_ACT, mb, chunk))
            elif op == Op.BACKWARD_WEIGHT:
                out.append(Action(op, mb, chunk))  # local: the input's gradient has already gone
            else:
                if vs < last:
                    out.append(Action(Op.RECV_GRAD, mb, chunk))
                out.append(Action(op, mb, chunk))
                if vs > 0:
                    out.append(Action(Op.SEND_GRAD, mb, chunk))
        if train:
            out += [Action(Op.REDUCE_TIED), Action(Op.REDUCE_GRADS), Action(Op.STEP)]
        actions.append(tuple(out))
    return Schedule(name, stages, micro_batches, chunks, train, tuple(actions))
