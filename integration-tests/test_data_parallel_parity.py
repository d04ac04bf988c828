"""The demo's data-parallel training through zero-comm matches a plain single-process loop.

Each rank trains on its slice of the global batch and averages gradients with
bucketed all-reduces; the losses and final weights must equal those of one
process training on the whole batch with torch.optim.AdamW.

In fp32 the two differ only by summation order, which Adam amplifies for
gradient elements near zero, so fp32 is held to the loss curve (1e-5) and fp64
to both losses and every weight (1e-10): the algorithm is the same, exactly.
"""

import sys
from pathlib import Path

import pytest
import torch

from zero_comm.testing import WORLD_SIZES, run_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import data_parallel
import gpt

STEPS, BATCH = 12, 8


def reference(dtype: torch.dtype) -> tuple[list[float], dict[str, torch.Tensor]]:
    torch.set_default_dtype(dtype)
    torch.manual_seed(0)
    cfg = gpt.GPTConfig()
    model = gpt.GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    losses = []
    for step in range(STEPS):
        x, y = gpt.global_batch(step, BATCH, cfg)
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, model.state_dict()


def trained_data_parallel(dtype: torch.dtype) -> tuple[list[float], dict[str, torch.Tensor]]:
    torch.set_default_dtype(dtype)
    losses, model = data_parallel.train(steps=STEPS, batch_size=BATCH, log_every=0)
    return losses, model.state_dict()


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_losses_and_weights_match_single_process(world_size, dtype):
    (want_losses, want_state), = run_ranks(reference, 1, dtype)  # a plain loop, in a fresh process
    results = run_ranks(trained_data_parallel, world_size, dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for rank, (losses, state) in enumerate(results):
        rel = max(abs(a - b) / abs(b) for a, b in zip(losses, want_losses))
        assert rel <= tol, f"rank {rank}: loss curve differs by {rel:.2e}"
        if dtype == torch.float32:
            continue
        for name, want in want_state.items():
            assert _max_rel(state[name], want) <= tol, f"rank {rank}: {name} differs"
    # every rank ends with identical weights
    for name in want_state:
        assert all(torch.equal(r[1][name], results[0][1][name]) for r in results)


def check_uneven_batch_is_refused() -> None:
    with pytest.raises(ValueError, match="must divide evenly over 4 ranks"):
        data_parallel.train(steps=1, batch_size=6, log_every=0)


def test_uneven_batch_is_refused():
    run_ranks(check_uneven_batch_is_refused, 4)
