"""Tensor parallel 2: a GPT with its attention, MLP, embedding and head split over two ranks trains exactly
like the whole model in one process (fp32, tight)."""

import pytest
import tiny_gpt
import torch
import tp_ranks

from zero_comm.testing import run_ranks

STEPS, LR = 3, 0.1


def test_tensor_parallel_gpt_matches_single_process() -> None:
    want_losses, want_eval, want = tiny_gpt.reference_run(2, STEPS, LR, tied=False)
    for rank, (rewritten, losses, evaluation, weights) in enumerate(run_ranks(tp_ranks.train_tp, 2, 2, STEPS, LR)):
        assert rewritten == [f"{b}.{n}" for b in (1, 2) for n in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")]
        assert losses == pytest.approx(want_losses, rel=1e-5)
        assert evaluation == pytest.approx(want_eval, rel=1e-5)
        for name, value in weights.items():
            torch.testing.assert_close(value, want[f"layers.{name.removeprefix('stack.')}"], rtol=1e-5, atol=1e-6,
                                       msg=f"rank {rank}: {name}")


def test_gathered_column_and_scattered_row_layers() -> None:
    for values, grad, want_grad in run_ranks(tp_ranks.gathered_output, 2, 5):
        torch.testing.assert_close(values[0], values[1])
        torch.testing.assert_close(grad, want_grad)
