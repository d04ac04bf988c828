"""A pipelined GPT trains exactly like the whole model in one process (fp32, tight).

The tiny GPT has its token embedding tied to its output head, so the two sit on the
first and last stage and their gradients must be summed across the tie. Each
schedule, at each micro-batch count, trains three SGD-momentum steps and
evaluates once; losses and every weight must match the plain torch loop on whole
batches.
"""

import pipe_parity
import pytest
import tiny_gpt
import torch

from zero_comm.testing import run_ranks

STEPS = 3
CASES = [(s, m) for s in ("gpipe", "1f1b", "interleaved", "zb-h1") for m in (4, 8)]


def assert_matches(got: tuple, want: tuple, where: str) -> None:
    losses, evaluation, weights = got
    ref_losses, ref_eval, ref_weights = want
    assert losses == pytest.approx(ref_losses, rel=1e-5), where
    assert evaluation == pytest.approx(ref_eval, rel=1e-5), where
    for name, value in weights.items():
        torch.testing.assert_close(value, ref_weights[name], rtol=1e-5, atol=1e-6, msg=f"{where}: {name}")


@pytest.mark.parametrize("world_size", [2, 4])
def test_schedules_match_single_process(world_size: int) -> None:
    n_blocks = 5  # 8 layers: enough for 4 stages x 2 chunks
    want = tiny_gpt.reference_run(n_blocks, STEPS)
    results = run_ranks(pipe_parity.schedules_run, world_size, n_blocks, STEPS, CASES, timeout=240)
    for case in CASES:
        seen = set()
        for rank, per_rank in enumerate(results):
            got = per_rank[case]
            assert_matches(got, want, f"{case} rank {rank}")
            seen |= set(got[2])
        assert seen == set(want[2]), case  # the stages together hold every parameter


def test_pipeline_by_data_parallel_grid_matches_single_process() -> None:
    """pp 2 x dp 2 on four ranks: gradients averaged over the data-parallel group give the whole-batch step."""
    want = tiny_gpt.reference_run(2, STEPS)
    for rank, got in enumerate(run_ranks(pipe_parity.grid_run, 4, 2, STEPS, "1f1b", 4, timeout=120)):
        assert_matches(got, want, f"rank {rank}")


@pytest.mark.parametrize(("tied", "interval", "partition"), [(False, 1, "uniform"), (True, 2, "type:block")])
def test_untied_checkpointed_and_partitioned_variants_match(tied: bool, interval: int, partition: str) -> None:
    want = tiny_gpt.reference_run(3, STEPS, tied=tied)
    for rank, got in enumerate(run_ranks(pipe_parity.options_run, 2, 3, STEPS, tied, interval, partition,
                                         timeout=120)):
        assert_matches(got, want, f"rank {rank}")


def test_pipeline_by_tensor_parallel_grid_matches_single_process() -> None:
    """pp 2 x tp 2 on four ranks: blocks split over each stage's tensor-parallel pair, the tie across stages."""
    want = tiny_gpt.reference_run(2, STEPS)
    for rank, (rewritten, *got) in enumerate(run_ranks(pipe_parity.pipe_tp_run, 4, 2, STEPS, timeout=120)):
        block = 1 if rank < 2 else 2  # stage 0 holds the embedding and block 1; stage 1 block 2, norm, head
        assert rewritten == [f"layers.{block}.{n}" for n in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")]
        assert_matches(tuple(got), want, f"rank {rank}")


@pytest.mark.parametrize(("schedule", "loss_scale"), [("1f1b", None), ("1f1b", 1024.0), ("zb-h1", 1024.0)])
def test_stages_holding_different_ties_sum_each_tie_gradient(schedule: str, loss_scale: float | None) -> None:
    """Stage 2 holds ties "a" and "b", stages 0 and 1 one each: every copy ends with the whole gradient
    (times fp16's loss scale, which the last stage's loss is multiplied by, under either backward)."""
    layers = pipe_parity.two_ties_layers()
    built = {}
    for i, spec in enumerate(layers):
        key = getattr(spec, "key", str(i))
        if key not in built:
            torch.manual_seed(tiny_gpt.SEED + i)
            built[key] = spec.build()
    x, y = torch.randn(4, 4), torch.randn(4, 4)
    out = x
    for i, spec in enumerate(layers):
        out = built[getattr(spec, "key", str(i))](out)
    pipe_parity.mse(out, y).backward()
    want = {f"tied.{k}.{n}" if k in "ab" else f"layers.{k}.{n}": p.grad for k, m in built.items()
            for n, p in m.named_parameters()}
    grads = run_ranks(pipe_parity.two_ties_run, 3, x, y, schedule, loss_scale, timeout=90)
    assert sorted(grads[2]) == ["tied.a.bias", "tied.a.weight", "tied.b.bias", "tied.b.weight"]
    for rank, per_rank in enumerate(grads):
        for name, grad in per_rank.items():
            torch.testing.assert_close(grad, want[name] * (loss_scale or 1.0), rtol=1e-5, atol=1e-7,
                                       msg=f"rank {rank}: {name}")
