"""Run a schedule without processes: does it complete, how much does it hold, how long does it idle.

Each rank walks its instruction list in order. A send is asynchronous: it puts a
message on the (sender, receiver) channel, stamped with the sender's clock. A
receive blocks until its message is on the channel (in any position: the
interpreter's transport stashes messages that arrive before they are wanted) and
then advances the receiver's clock to the message's time. Forward and backward
cost ``forward_cost`` and ``backward_cost`` time units; communication is free.

The walk stops when every rank is done -- or when no rank can move, which is a
deadlock, reported with what every stuck rank waits for.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._schedule import Action, Op, Schedule

__all__ = ["ScheduleError", "SimResult", "message_key", "simulate", "theoretical_bubble"]


class ScheduleError(ValueError):
    """A schedule that cannot run: it deadlocks, or its instructions do not fit together."""


@dataclass(frozen=True)
class SimResult:
    """What a simulated batch did.

    Attributes:
        makespan: time from the first instruction to the last rank's end.
        busy: per rank, the time spent computing.
        peak_activations: per rank, the most (micro-batch, chunk) activations held at
            once (from a forward until its backward; a forward-only schedule holds none).
        bubble_fraction: idle share of all ranks' time, ``1 - sum(busy) / (ranks * makespan)``.
    """

    makespan: float
    busy: tuple[float, ...]
    peak_activations: tuple[int, ...]
    bubble_fraction: float
    spans: tuple[tuple[int, float, float, Action], ...] = ()  # (rank, start, end, forward or backward)

    def timeline(self, stages: int) -> str:
        """One text row per rank, one character per time unit: a forward of micro-batch ``k`` is the
        digit ``k % 10``, its backward (or input-gradient half) the letter ``"abcdefghij"[k % 10]``,
        a weight-gradient half the capital letter, idle time ``.``."""
        end = round(self.makespan)
        rows = [["."] * end for _ in range(stages)]
        for rank, start, stop, a in self.spans:
            mark = (str(a.micro_batch % 10) if a.op == Op.FORWARD else "ABCDEFGHIJ"[a.micro_batch % 10]
                    if a.op == Op.BACKWARD_WEIGHT else "abcdefghij"[a.micro_batch % 10])
            for t in range(round(start), round(stop)):
                rows[rank][t] = mark
        return "\n".join(f"stage {r}: {''.join(row)}" for r, row in enumerate(rows))


def theoretical_bubble(stages: int, micro_batches: int, chunks: int = 1) -> float:
    """The textbook bubble ``(p - 1) / (v * m + p - 1)`` of GPipe/1F1B (``v = 1``) and interleaved 1F1B."""
    return (stages - 1) / (chunks * micro_batches + stages - 1)


def simulate(schedule: Schedule, *, forward_cost: float = 1.0, backward_cost: float = 2.0,
             weight_cost: float | None = None) -> SimResult:
    """Run ``schedule`` on a model of the pipeline; raise :class:`ScheduleError` if it cannot finish.

    A backward split in two (zero-bubble schedules) costs ``backward_cost - weight_cost`` for
    the input's gradient and ``weight_cost`` (default: half the backward) for the weights'.
    """
    weight = backward_cost / 2 if weight_cost is None else weight_cost
    costs = {Op.FORWARD: forward_cost, Op.BACKWARD: backward_cost, Op.BACKWARD_INPUT: backward_cost - weight,
             Op.BACKWARD_WEIGHT: weight}
    p = schedule.stages
    pc = [0] * p
    clock = [0.0] * p
    busy = [0.0] * p
    held: list[set[tuple[int, int]]] = [set() for _ in range(p)]
    peak = [0] * p
    channels: dict[tuple[int, int], dict[tuple[str, int, int], float]] = {}
    done_compute: set[tuple[Op, int, int]] = set()
    spans: list[tuple[int, float, float, Action]] = []
    progressed = True
    while progressed:
        progressed = False
        for rank in range(p):
            acts = schedule.actions[rank]
            while pc[rank] < len(acts):
                a = acts[pc[rank]]
                if a.op in (Op.RECV_ACT, Op.RECV_GRAD):
                    src, key = _peer(schedule, rank, a), message_key(schedule, rank, a)
                    channel = channels.get((src, rank), {})
                    if key not in channel:
                        break
                    clock[rank] = max(clock[rank], channel.pop(key))
                elif a.op in (Op.SEND_ACT, Op.SEND_GRAD):
                    dst, key = _peer(schedule, rank, a), message_key(schedule, rank, a)
                    channel = channels.setdefault((rank, dst), {})
                    if key in channel:
                        raise ScheduleError(f"rank {rank} sends {a} twice")
                    channel[key] = clock[rank]
                elif a.op in costs:
                    _check_compute(schedule, rank, a, done_compute, held[rank])
                    cost = costs[a.op]
                    spans.append((rank, clock[rank], clock[rank] + cost, a))
                    clock[rank] += cost
                    busy[rank] += cost
                    peak[rank] = max(peak[rank], len(held[rank]))
                pc[rank] += 1
                progressed = True
    stuck = [r for r in range(p) if pc[r] < len(schedule.actions[r])]
    if stuck:
        waits = "; ".join(f"rank {r} waits at {schedule.actions[r][pc[r]]}" for r in stuck)
        raise ScheduleError(f"{schedule.name} schedule ({p} stages, {schedule.micro_batches} micro-batches) "
                            f"deadlocks: {waits}")
    left = {k: v for k, v in channels.items() if v}
    if left:
        raise ScheduleError(f"{schedule.name} schedule leaves messages nobody receives: {left}")
    _check_complete(schedule, done_compute)
    makespan = max(clock)
    bubble = 1.0 - sum(busy) / (p * makespan) if makespan > 0 else 0.0
    return SimResult(makespan, tuple(busy), tuple(peak), bubble, tuple(spans))


def _peer(schedule: Schedule, rank: int, a: Action) -> int:
    vs = schedule.virtual_stage(rank, a.chunk)
    downstream = a.op in (Op.SEND_ACT, Op.RECV_GRAD)
    other = vs + 1 if downstream else vs - 1
    if not 0 <= other < schedule.virtual_stages:
        raise ScheduleError(f"rank {rank}: {a} has no peer (virtual stage {vs} of {schedule.virtual_stages})")
    return schedule.place(other)[0]


def message_key(schedule: Schedule, rank: int, a: Action) -> tuple[str, int, int]:
    """A message is named by what it carries, its micro-batch and the virtual stage that receives it,
    so both ends name it alike."""
    vs = schedule.virtual_stage(rank, a.chunk)
    if a.op in (Op.RECV_ACT, Op.RECV_GRAD):
        return ("act" if a.op == Op.RECV_ACT else "grad", a.micro_batch, vs)
    return ("act", a.micro_batch, vs + 1) if a.op == Op.SEND_ACT else ("grad", a.micro_batch, vs - 1)


def _check_compute(schedule: Schedule, rank: int, a: Action, done: set[tuple[Op, int, int]],
                   held: set[tuple[int, int]]) -> None:
    vs = schedule.virtual_stage(rank, a.chunk)
    key = (a.op, a.micro_batch, vs)
    if key in done:
        raise ScheduleError(f"rank {rank} runs {a} twice")
    if not 0 <= a.micro_batch < schedule.micro_batches:
        raise ScheduleError(f"rank {rank}: {a} names a micro-batch outside 0..{schedule.micro_batches - 1}")
    unit = (a.micro_batch, a.chunk)
    needs = {Op.BACKWARD: Op.FORWARD, Op.BACKWARD_INPUT: Op.FORWARD, Op.BACKWARD_WEIGHT: Op.BACKWARD_INPUT}
    if a.op in needs and (needs[a.op], a.micro_batch, vs) not in done:
        raise ScheduleError(f"rank {rank} runs {a} before its {needs[a.op].value}")
    if a.op == Op.BACKWARD_INPUT and (Op.BACKWARD, a.micro_batch, vs) in done:
        raise ScheduleError(f"rank {rank} runs {a} after a whole backward of the same micro-batch")
    if a.op in (Op.BACKWARD, Op.BACKWARD_WEIGHT):
        held.discard(unit)  # activations are kept until the weights' gradients are done
    elif a.op == Op.FORWARD and schedule.train:
        held.add(unit)
    done.add(key)


def _check_complete(schedule: Schedule, done: set[tuple[Op, int, int]]) -> None:
    missing = []
    for mb in range(schedule.micro_batches):
        for vs in range(schedule.virtual_stages):
            if (Op.FORWARD, mb, vs) not in done:
                missing.append(("forward", mb, vs))
            whole = (Op.BACKWARD, mb, vs) in done
            split = (Op.BACKWARD_INPUT, mb, vs) in done and (Op.BACKWARD_WEIGHT, mb, vs) in done
            if schedule.train and not (whole or split):
                missing.append(("backward", mb, vs))
    if missing:
        raise ScheduleError(f"{schedule.name} schedule never runs {missing[:5]}"
                            + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
