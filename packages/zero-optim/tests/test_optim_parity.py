"""ZeRO stages 0, 1 and 2 train exactly like a single-process torch.optim.AdamW loop.

The same model, data and seed: a plain loop on the whole global batch, and zero
at world sizes 1, 2 and 4 (each rank a slice of the batch), with and without
gradient accumulation and global-norm clipping. fp32 must match to 1e-5
(relative, losses and every weight); bf16 and fp16 (with loss scaling) must
track the fp32 loss curve to a stated tolerance.
"""

import pytest
import torch
import zero_models
from parity import LR, WD, max_rel, reference, rel, train

import zero_comm
from zero_comm.testing import WORLD_SIZES, run_ranks
from zero_optim import AdamW, ZeroConfig, ZeroOptimizer

CONFIGS = [(stage, accum, clip) for stage in (0, 1, 2) for accum, clip in ((1, None), (2, 0.5))]


def train_zero(name: str, stage: int, accum: int, clip: float | None, precision: str = "fp32",
               bucket_numel: int = 20_000) -> tuple[list[float], dict[str, torch.Tensor]]:
    comm = zero_comm.init_distributed()
    model = zero_models.make_model(name)
    config = ZeroConfig(stage=stage, precision=precision, accumulation_steps=accum, clip_grad_norm=clip,
                        bucket_numel=bucket_numel)
    opt = ZeroOptimizer(model.parameters(), AdamW(lr=LR, weight_decay=WD), comm=comm, config=config)
    losses, _ = train(model, opt, comm, name, accum)
    return losses, {k: v.detach().float().clone() for k, v in model.state_dict().items()}


def all_fp32_configs(name: str) -> dict:
    return {cfg: train_zero(name, *cfg) for cfg in CONFIGS}


@pytest.mark.parametrize("name", ["mlp", "gpt"])
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_fp32_stages_match_single_process_adamw(name, world_size):
    refs = {(a, c): run_ranks(reference, 1, name, a, c)[0][:2] for a, c in {(a, c) for _, a, c in CONFIGS}}
    per_rank = run_ranks(all_fp32_configs, world_size, name, timeout=600)
    for rank, results in enumerate(per_rank):
        for (stage, accum, clip), (losses, weights) in results.items():
            want_losses, want_weights = refs[(accum, clip)]
            what = f"rank {rank}, stage {stage}, accumulation {accum}, clip {clip}"
            loss_err = max_rel(losses, want_losses)
            assert loss_err <= 1e-5, f"{what}: losses differ by {loss_err:.2e}"
            for key, want in want_weights.items():
                err = rel(weights[key], want)
                assert err <= 1e-5, f"{what}: {key} differs by {err:.2e}"


def mixed_precision_curves(name: str) -> dict:
    return {(precision, stage): train_zero(name, stage, 1, None, precision)[0]
            for precision in ("bf16", "fp16") for stage in (0, 1, 2)}


MIXED_TOLERANCE = {"bf16": 0.03, "fp16": 0.005}  # max relative distance from the fp32 loss curve


@pytest.mark.parametrize("world_size", [1, 2])
def test_mixed_precision_tracks_the_fp32_loss_curve(world_size):
    want = run_ranks(reference, 1, "gpt", 1, None)[0][0]
    curves = run_ranks(mixed_precision_curves, world_size, "gpt", timeout=600)[0]
    for (precision, stage), losses in curves.items():
        err = max_rel(losses, want)
        assert err <= MIXED_TOLERANCE[precision], f"{precision} stage {stage}: {err:.3e} from the fp32 curve"
        fell, want_fell = losses[0] - losses[-1], want[0] - want[-1]
        assert fell > 0.5 * want_fell, f"{precision} stage {stage}: loss fell {fell:.3f}, fp32 {want_fell:.3f}"
