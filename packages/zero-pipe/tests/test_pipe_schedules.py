"""Schedules as data: every schedule completes for p in {2, 3, 4} and m in 1..16, checked by the simulator."""

import pytest

from zero_pipe import (
    Action,
    Op,
    Schedule,
    ScheduleError,
    gpipe,
    interleaved_1f1b,
    make_schedule,
    one_f_one_b,
    simulate,
    theoretical_bubble,
    zb_h1,
)

STAGES = (2, 3, 4)
MICRO = range(1, 17)


@pytest.mark.parametrize("p", STAGES)
@pytest.mark.parametrize("train", [True, False])
def test_gpipe_and_1f1b_complete_with_the_textbook_bubble(p: int, train: bool) -> None:
    for m in MICRO:
        for make in (gpipe, one_f_one_b):
            result = simulate(make(p, m, train=train), forward_cost=1.0, backward_cost=1.0)
            assert result.bubble_fraction == pytest.approx(theoretical_bubble(p, m), abs=1e-12), (make, m)


@pytest.mark.parametrize("p", STAGES)
def test_1f1b_holds_at_most_p_micro_batches(p: int) -> None:
    for m in MICRO:
        peaks = simulate(one_f_one_b(p, m)).peak_activations
        assert max(peaks) <= p
        assert peaks == tuple(min(p - s, m) for s in range(p))
        # GPipe, for contrast, holds every micro-batch
        assert simulate(gpipe(p, m)).peak_activations == (m,) * p


@pytest.mark.parametrize("p", STAGES)
@pytest.mark.parametrize("chunks", [2, 3])
def test_interleaved_completes_and_shrinks_the_bubble(p: int, chunks: int) -> None:
    for m in range(p, 17, p):
        for train in (True, False):
            simulate(interleaved_1f1b(p, m, chunks, train=train))
        result = simulate(interleaved_1f1b(p, m, chunks), forward_cost=1.0, backward_cost=1.0)
        assert result.bubble_fraction == pytest.approx(theoretical_bubble(p, m, chunks), abs=1e-12)
        assert result.bubble_fraction < theoretical_bubble(p, m)


def test_interleaved_needs_a_multiple_of_the_stages() -> None:
    with pytest.raises(ValueError, match="multiple of 4; got 6"):
        interleaved_1f1b(4, 6, 2)


def test_every_compute_has_its_communication() -> None:
    s = one_f_one_b(3, 4)
    middle = s.actions[1]
    assert middle[:3] == (Action(Op.RECV_ACT, 0), Action(Op.FORWARD, 0), Action(Op.SEND_ACT, 0))
    assert middle[-3:] == (Action(Op.REDUCE_TIED), Action(Op.REDUCE_GRADS), Action(Op.STEP))
    assert s.actions[0][0] == Action(Op.LOAD, 0) and Action(Op.LOAD, 3) in s.actions[2]
    assert sum(a.op == Op.LOAD for a in s.actions[1]) == 0


def test_a_deadlocking_schedule_is_caught() -> None:
    good = one_f_one_b(2, 2)
    # stage 0 waits for a gradient before sending the activation the gradient depends on
    swapped = list(good.actions[0])
    send = swapped.index(Action(Op.SEND_ACT, 0))
    swapped.insert(send, swapped.pop(swapped.index(Action(Op.RECV_GRAD, 0))))
    bad = Schedule("bad", 2, 2, 1, True, (tuple(swapped), good.actions[1]))
    with pytest.raises(ScheduleError, match="deadlocks: rank 0 waits at recv_grad"):
        simulate(bad)


def test_a_schedule_missing_a_backward_is_caught() -> None:
    good = gpipe(2, 2)
    cut = tuple(a for a in good.actions[0] if a != Action(Op.BACKWARD, 1))
    with pytest.raises(ScheduleError, match="never runs"):
        simulate(Schedule("cut", 2, 2, 1, True, (cut, good.actions[1])))


def test_unknown_schedule_and_bad_sizes() -> None:
    with pytest.raises(ValueError, match="unknown pipeline schedule 'zb'"):
        make_schedule("zb", 2, 4)
    with pytest.raises(ValueError, match="micro_batches >= 1"):
        gpipe(2, 0)
    with pytest.raises(ValueError, match="interleaved"):
        make_schedule("1f1b", 2, 4, chunks=2)


def test_timeline_draws_the_1f1b_picture() -> None:
    assert simulate(one_f_one_b(2, 3)).timeline(2).splitlines() == [
        "stage 0: 01..aa2bb.cc",
        "stage 1: .0aa1bb2cc..",
    ]


@pytest.mark.parametrize("p", STAGES)
def test_zb_h1_beats_1f1b_in_the_same_memory(p: int) -> None:
    """Forward, input gradient and weight gradient of equal cost: ZB-H1 idles (p - 1) units per stage
    where 1F1B idles 3 (p - 1), and holds at most p micro-batches, 1F1B's most."""
    for m in MICRO:
        for train in (True, False):
            simulate(zb_h1(p, m, train=train))
        zb = simulate(zb_h1(p, m), forward_cost=1.0, backward_cost=2.0, weight_cost=1.0)
        ofob = simulate(one_f_one_b(p, m), forward_cost=1.0, backward_cost=2.0)
        assert max(zb.peak_activations) <= p
        assert zb.bubble_fraction <= ofob.bubble_fraction
        if m >= p:
            assert zb.bubble_fraction == pytest.approx((p - 1) / (3 * m + p - 1), abs=1e-12)
            assert ofob.bubble_fraction == pytest.approx(theoretical_bubble(p, m), abs=1e-12)


def test_a_weight_gradient_before_its_input_gradient_is_caught() -> None:
    good = zb_h1(2, 2)
    swapped = list(good.actions[1])
    i, j = swapped.index(Action(Op.BACKWARD_INPUT, 0)), swapped.index(Action(Op.BACKWARD_WEIGHT, 0))
    swapped[i], swapped[j] = swapped[j], swapped[i]
    with pytest.raises(ScheduleError, match=r"runs backward_weight\(mb=0, chunk=0\) before its backward_input"):
        simulate(Schedule("bad", 2, 2, 1, True, (good.actions[0], tuple(swapped))))
