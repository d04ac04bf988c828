"""Fused linear + cross-entropy equals a float64 computation, and never holds the logits."""

import pytest
import torch
import torch.nn.functional as F

import zero_kernels as zk

TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _case(n, hidden, vocab, dtype, seed=0, ignore_some=True):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, hidden, generator=g)).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g) * hidden**-0.5).to(dtype)
    b = (torch.randn(vocab, generator=g) * 0.1).to(dtype)
    t = torch.randint(0, vocab, (n,), generator=g)
    if ignore_some:
        t[::5] = -100
    return x, w, b, t


@pytest.mark.parametrize("n, hidden, vocab, chunk", [(1, 4, 3, None), (37, 16, 1001, 8), (64, 32, 5000, 13)])
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_loss_and_gradients_match_float64(path, n, hidden, vocab, chunk, dtype, reduction, with_bias):
    x, w, b, t = _case(n, hidden, vocab, dtype, ignore_some=n > 1)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    b64 = b.double().requires_grad_() if with_bias else None
    want = F.cross_entropy(F.linear(x64, w64, b64), t, reduction=reduction, ignore_index=-100)
    want.backward(torch.tensor(1.5, dtype=torch.float64))
    xt, wt = x.to(path).requires_grad_(), w.to(path).requires_grad_()
    bt = b.to(path).requires_grad_() if with_bias else None
    loss = zk.fused_linear_cross_entropy(xt, wt, t.to(path), bt, reduction=reduction, chunk_size=chunk)
    (loss * 1.5).backward()
    tol = TOL[dtype]
    assert abs(loss.item() - want.item()) <= tol * max(1.0, abs(want.item())), (loss.item(), want.item())
    for got, ref, name in [(xt.grad, x64.grad, "x"), (wt.grad, w64.grad, "weight")] + (
            [(bt.grad, b64.grad, "bias")] if with_bias else []):
        err = (got.double().cpu() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)
        assert err <= tol * 4, f"{name} gradient: relative error {err:.2e}"
        assert got.dtype == dtype


def test_all_ignored_gives_zero_loss_and_gradients():
    x, w, _, t = _case(6, 8, 10, torch.float32)
    t[:] = -100
    x.requires_grad_()
    loss = zk.fused_linear_cross_entropy(x, w, t)
    loss.backward()
    assert loss.item() == 0 and x.grad.eq(0).all()


def test_peak_memory_is_far_below_the_logits():
    """GPT-2's vocabulary over 8k tokens: fp32 logits would be 1.6 GB; the fused op stays near one chunk."""
    n, hidden, vocab = 8192, 32, 50257
    x, w, _, t = _case(n, hidden, vocab, torch.float32, ignore_some=False)
    x.requires_grad_()
    w.requires_grad_()
    logits_bytes = n * vocab * 4

    def fused():
        zk.fused_linear_cross_entropy(x, w, t).backward()

    def eager():
        F.cross_entropy(x @ w.t(), t).backward()

    fused_peak = zk.peak_memory(fused)
    x.grad = w.grad = None
    eager_peak = zk.peak_memory(eager)
    assert eager_peak >= logits_bytes, "the measurement must see torch's logits"
    assert fused_peak <= 0.1 * logits_bytes, f"fused peak {fused_peak / 2**20:.0f} MiB"


def test_bad_shapes_are_named():
    x, w, b, t = _case(4, 8, 10, torch.float32)
    with pytest.raises(ValueError, match=r"weight must have shape \(vocab, 8\)"):
        zk.fused_linear_cross_entropy(x, w[:, :4], t)
    with pytest.raises(ValueError, match=r"target must have shape \(4,\)"):
        zk.fused_linear_cross_entropy(x, w, t[:3])
    with pytest.raises(ValueError, match=r"bias must have shape \(10,\)"):
        zk.fused_linear_cross_entropy(x, w, t, b[:5])
    with pytest.raises(ValueError, match="reduction"):
        zk.fused_linear_cross_entropy(x, w, t, reduction="none")
