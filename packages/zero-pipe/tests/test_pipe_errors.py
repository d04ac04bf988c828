"""Bad input gives a clear error that names the stage and what is wrong, on every rank, in bounded time."""

import time

import pipe_errors
import pytest
import tiny_gpt
import torch

from zero_comm.testing import RankFailure, run_ranks
from zero_pipe import PipelineModule

# run_ranks would let a rank blocked in a receive wait this long; the pipeline must end far sooner
COLLECTIVE_TIMEOUT = 60.0


def fails_fast(fn, world_size: int = 2) -> RankFailure:
    start = time.monotonic()
    with pytest.raises(RankFailure) as info:
        run_ranks(fn, world_size, timeout=90, grace=COLLECTIVE_TIMEOUT, collective_timeout=COLLECTIVE_TIMEOUT)
    assert time.monotonic() - start < 30, "the ranks waited for a timeout instead of failing together"
    return info.value


def test_more_stages_than_layers() -> None:
    with pytest.raises(ValueError, match="cannot cut 5 layers into 8 stages"):
        PipelineModule(tiny_gpt.layers(2), 8, stage_id=0)
    with pytest.raises(ValueError, match="matches 2 layers, fewer than the 3 parts"):
        PipelineModule(tiny_gpt.layers(2), 3, stage_id=0, partition_method="type:block")


def test_batch_not_divisible_into_micro_batches() -> None:
    err = fails_fast(pipe_errors.indivisible_batch)
    assert "a batch of 6 (inputs) cannot be split into 4 equal micro-batches" in str(err)


def test_changed_activation_shape_is_refused_by_its_sender() -> None:
    err = fails_fast(pipe_errors.changed_shape)
    assert ("stage 0 would send stage 1 the activation of micro-batch 0 as float32[2, 6, 16], but the first "
            "batch fixed it as float32[2, 8, 16]") in str(err)
    assert "PipelineAborted: stage 0 failed and aborted the pipeline" in str(err)
    assert err.failed_ranks == [0, 1]  # the cause first, then the stage it aborted


def test_wrong_dtype_names_the_stage_and_the_tensor() -> None:
    err = fails_fast(pipe_errors.wrong_dtype)
    assert "stage 1 (layers 3-5) failed in the forward of micro-batch 0 on the activation from stage 0 " \
           "(float64[2, 8, 16])" in str(err)


def test_a_failure_reaches_stages_waiting_on_others() -> None:
    err = fails_fast(pipe_errors.failing_middle_stage, 4)
    assert "stage 2 (layers 3-4) failed in the forward of micro-batch 0" in str(err)
    assert "boom: this layer always fails" in str(err)
    assert err.failed_ranks[0] == 2 and sorted(err.failed_ranks) == [0, 1, 2, 3]


def test_dynamic_shapes_accept_a_changed_shape() -> None:
    want = tiny_gpt.Reference(2)
    x, y = tiny_gpt.batches(1, size=4)[0]
    with torch.no_grad():
        expected = [tiny_gpt.loss_fn(want(x), y).item(), tiny_gpt.loss_fn(want(x[:, :6]), y[:, :6]).item()]
    for got in run_ranks(pipe_errors.changed_shape_allowed, 2):
        assert got == pytest.approx(expected, rel=1e-5)


def test_engine_arguments_that_cannot_work() -> None:
    (errors,) = run_ranks(pipe_errors.construction_errors, 1)
    assert len(errors) == 3
    assert "zero-bubble schedule splits each backward in two" in errors[0]
    assert "the interleaved schedule needs a module with several model chunks" in errors[1]
    assert "micro_batches must be >= 1, got 0" in errors[2]
