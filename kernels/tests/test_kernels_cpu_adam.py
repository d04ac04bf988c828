"""adam_step on CPU tensors (the step of an offloaded optimizer) is torch.optim.AdamW's (and Adam's)
maths, across the chunks it steps in, with low-precision gradients, a grad scale and a weight copy."""

from __future__ import annotations

import pytest
import torch

import zero_kernels as zk
from zero_kernels import _adam

HPARAMS = {"lr": 1e-2, "beta1": 0.8, "beta2": 0.95, "eps": 1e-6}


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> int:
    """Chunks of 1000 elements, so a few thousand elements cross several chunk boundaries."""
    monkeypatch.setattr(_adam, "CPU_CHUNK", 1000)
    monkeypatch.delenv("ZERO_KERNELS", raising=False)
    return 1000


def _torch_steps(start: torch.Tensor, grads: list[torch.Tensor], *, adamw: bool, weight_decay: float) -> torch.Tensor:
    p = torch.nn.Parameter(start.clone())
    cls = torch.optim.AdamW if adamw else torch.optim.Adam
    opt = cls([p], lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay, foreach=False)
    for grad in grads:
        p.grad = grad.clone()
        opt.step()
    return p.detach()


def _data(numel: int, steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(numel)
    return torch.randn(numel, generator=g), [torch.randn(numel, generator=g) for _ in range(steps)]


@pytest.mark.parametrize("numel", [1, 1000, 4099])
@pytest.mark.parametrize("adamw", [True, False], ids=["adamw", "adam"])
def test_matches_torch_optim_across_chunks_and_writes_the_weight_copy(small_chunks: int, numel: int, adamw: bool):
    start, grads = _data(numel, 3)
    expected = _torch_steps(start, grads, adamw=adamw, weight_decay=0.1)
    p, m, v = start.clone(), torch.zeros(numel), torch.zeros(numel)
    lowp = torch.empty(numel, dtype=torch.bfloat16)
    for step, grad in enumerate(grads, 1):
        zk.adam_step(p, grad, m, v, **HPARAMS, weight_decay=0.1, step=step, decoupled=adamw, lowp_out=lowp)
    torch.testing.assert_close(p, expected, rtol=1e-6, atol=1e-7)
    assert torch.equal(lowp, p.to(torch.bfloat16))  # the weight copy, written chunk by chunk


def test_fp32_without_a_copy_matches_torch_optim():
    start, grads = _data(4099, 3)
    expected = _torch_steps(start, grads, adamw=True, weight_decay=0.01)
    p, m, v = start.clone(), torch.zeros(4099), torch.zeros(4099)
    for step, grad in enumerate(grads, 1):
        zk.adam_step(p, grad, m, v, **HPARAMS, weight_decay=0.01, step=step)
    torch.testing.assert_close(p, expected, rtol=1e-6, atol=1e-7)


def test_grad_scale_is_folded_in(small_chunks: int):
    start, grads = _data(3000, 2)
    expected = _torch_steps(start, grads, adamw=True, weight_decay=0.0)
    p, m, v = start.clone(), torch.zeros(3000), torch.zeros(3000)
    for step, grad in enumerate(grads, 1):
        zk.adam_step(p, grad * 1024, m, v, **HPARAMS, step=step, grad_scale=1 / 1024)
    torch.testing.assert_close(p, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_gradients_are_widened_per_chunk(small_chunks: int, grad_dtype: torch.dtype):
    start, grads = _data(3000, 2)
    lowp = [start.clone(), torch.zeros(3000), torch.zeros(3000)]
    wide = [start.clone(), torch.zeros(3000), torch.zeros(3000)]
    for step, grad in enumerate(grads, 1):
        g16 = grad.to(grad_dtype)
        zk.adam_step(*lowp[:1], g16, *lowp[1:], lr=1e-2, step=step)
        zk.adam_step(*wide[:1], g16.float(), *wide[1:], lr=1e-2, step=step)
    for ours, theirs in zip(lowp, wide, strict=True):
        assert torch.equal(ours, theirs)


def test_chunking_changes_no_bit(monkeypatch: pytest.MonkeyPatch):
    # (chunks that are multiples of the SIMD width: the kernel's scalar tail rounds differently by an ulp)
    start, grads = _data(2500, 2)
    results = []
    for chunk in (1 << 20, 1000, 64):
        monkeypatch.setattr(_adam, "CPU_CHUNK", chunk)
        p, m, v = start.clone(), torch.zeros(2500), torch.zeros(2500)
        out = torch.empty(2500, dtype=torch.float16)
        for step, grad in enumerate(grads, 1):
            zk.adam_step(p, grad.to(torch.bfloat16), m, v, **HPARAMS, weight_decay=0.1, step=step, lowp_out=out)
        results.append((p, m, v, out))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))


def test_a_strided_weight_copy_is_written_too(small_chunks: int):
    start, grads = _data(2000, 1)
    p, m, v = start.clone(), torch.zeros(2000), torch.zeros(2000)
    out = torch.empty(40, 50, dtype=torch.bfloat16).t()  # 2000 elements, not contiguous
    zk.adam_step(p, grads[0], m, v, lr=1e-2, step=1, lowp_out=out)
    assert torch.equal(out, p.view(50, 40).to(torch.bfloat16))


def test_non_contiguous_tensors_run_the_formulas():
    start, grads = _data(2000, 2)
    expected = _torch_steps(start, grads, adamw=True, weight_decay=0.1)
    p = start.clone().view(40, 50).t().contiguous().t()  # same values, strided
    m, v = torch.zeros(40, 50).t().contiguous().t(), torch.zeros(40, 50).t().contiguous().t()
    for step, grad in enumerate(grads, 1):
        zk.adam_step(p, grad.view(40, 50), m, v, **HPARAMS, weight_decay=0.1, step=step)
    torch.testing.assert_close(p.reshape(-1), expected, rtol=1e-6, atol=1e-7)
