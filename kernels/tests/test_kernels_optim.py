"""Fused optimizer steps equal a float64 computation of the same update, on both paths,
for sizes that are not multiples of the block size and for fp32/bf16/fp16 gradients."""

import math

import pytest
import torch

import zero_kernels as zk

SIZES = [1, 1000, 1025, 4099]
GRAD_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(n, grad_dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed * 7919 + n)
    p = torch.randn(n, generator=g)
    grad = (torch.randn(n, generator=g) * 3).to(grad_dtype)
    m = torch.randn(n, generator=g) * 0.1
    v = torch.rand(n, generator=g) * 0.01
    return [t.to(device) for t in (p, grad, m, v)]


def _close(got, want, what):
    err = (got.double().cpu() - want).abs().max().item()
    assert err <= 1e-6 * max(1.0, want.abs().max().item()), f"{what}: max error {err:.3e}"


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES, ids=str)
@pytest.mark.parametrize("decoupled", [True, False], ids=["adamw", "adam"])
def test_adam_matches_float64(path, n, grad_dtype, decoupled):
    p, g, m, v = _inputs(n, grad_dtype, path)
    lr, b1, b2, eps, wd, step, scale = 1e-2, 0.9, 0.95, 1e-8, 0.1, 3, 0.5
    P, G, M, V = (t.double().cpu() for t in (p, g, m, v))
    G = G * scale
    if not decoupled:
        G = G + wd * P
    M = b1 * M + (1 - b1) * G
    V = b2 * V + (1 - b2) * G * G
    if decoupled:
        P = P * (1 - lr * wd)
    P = P - lr / (1 - b1**step) * M / (V.sqrt() / math.sqrt(1 - b2**step) + eps)
    low = torch.empty(n, dtype=torch.bfloat16, device=path)
    zk.adam_step(p, g, m, v, lr=lr, beta1=b1, beta2=b2, eps=eps, weight_decay=wd, step=step,
                 decoupled=decoupled, grad_scale=scale, lowp_out=low)
    _close(p, P, "params")
    _close(m, M, "exp_avg")
    _close(v, V, "exp_avg_sq")
    # the bf16 copy is the new fp32 weight rounded (the interpreter truncates: allow one bf16 step)
    assert torch.allclose(low.float().cpu(), p.cpu(), rtol=2**-7, atol=0)


def test_adamw_over_steps_equals_torch_optim(path):
    """Several steps on a list of tensors track torch.optim.AdamW."""
    torch.manual_seed(0)
    shapes = [37, 1000, 5]
    params = [torch.randn(s, device=path) for s in shapes]
    ref = [p.detach().clone().cpu().requires_grad_() for p in params]
    opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.05)
    ms = [torch.zeros_like(p) for p in params]
    vs = [torch.zeros_like(p) for p in params]
    for step in range(1, 6):
        grads = [torch.randn(s) for s in shapes]
        for r, gr in zip(ref, grads):
            r.grad = gr.clone()
        opt.step()
        zk.adam_step(params, [gr.to(path) for gr in grads], ms, vs, lr=1e-2, beta1=0.9, beta2=0.99,
                     weight_decay=0.05, step=step)
    for p, r in zip(params, ref):
        assert torch.allclose(p.cpu(), r.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES, ids=str)
def test_lion_matches_float64(path, n, grad_dtype):
    p, g, m, _ = _inputs(n, grad_dtype, path)
    lr, b1, b2, wd, scale = 1e-3, 0.9, 0.99, 0.1, 2.0
    P, G, M = (t.double().cpu() for t in (p, g, m))
    G = G * scale
    P = P * (1 - lr * wd) - lr * torch.sign(b1 * M + (1 - b1) * G)
    M = b2 * M + (1 - b2) * G
    zk.lion_step(p, g, m, lr=lr, beta1=b1, beta2=b2, weight_decay=wd, grad_scale=scale)
    _close(p, P, "params")
    _close(m, M, "exp_avg")


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("first_step", [True, False])
def test_sgd_matches_float64(path, n, nesterov, first_step):
    p, g, buf, _ = _inputs(n, torch.float32, path)
    lr, mom, wd = 0.1, 0.9, 0.01
    damp = 0.0 if nesterov else 0.1
    P, G, B = (t.double().cpu() for t in (p, g, buf))
    G = G + wd * P
    B = G.clone() if first_step else mom * B + (1 - damp) * G
    P = P - lr * (G + mom * B if nesterov else B)
    zk.sgd_step(p, g, buf, lr=lr, momentum=mom, dampening=damp, weight_decay=wd, nesterov=nesterov,
                first_step=first_step)
    _close(p, P, "params")
    _close(buf, B, "momentum buffer")


@pytest.mark.parametrize("lowp", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rule", ["adam", "lion", "sgd"])
def test_low_precision_weight_copy_is_the_new_weight(path, rule, lowp):
    """The bf16/fp16 copy written in the same pass is the updated fp32 weight, rounded."""
    p, g, m, v = _inputs(1025, torch.float16, path)
    out = torch.empty(1025, dtype=lowp, device=path)
    if rule == "adam":
        zk.adam_step(p, g, m, v, lr=1e-2, step=1, lowp_out=out)
    elif rule == "lion":
        zk.lion_step(p, g, m, lr=1e-2, lowp_out=out)
    else:
        zk.sgd_step(p, g, m, lr=1e-2, first_step=False, lowp_out=out)
    step = 2**-7 if lowp == torch.bfloat16 else 2**-10  # one step of the format's mantissa
    assert torch.allclose(out.float().cpu(), p.cpu(), rtol=step, atol=0)


def test_bad_inputs_are_named():
    p, g, m, v = _inputs(10, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"exp_avgs\[0\] must be fp32"):
        zk.adam_step(p, g, m.half(), v, lr=1e-3, step=1)
    with pytest.raises(ValueError, match=r"grads\[0\] has 9 elements, expected 10"):
        zk.adam_step(p, g[:9], m, v, lr=1e-3, step=1)
    with pytest.raises(ValueError, match="step must be >= 1"):
        zk.adam_step(p, g, m, v, lr=1e-3, step=0)
    with pytest.raises(ValueError, match="nesterov"):
        zk.sgd_step(p, g, m, lr=0.1, momentum=0.9, dampening=0.5, nesterov=True, first_step=True)


def test_forcing_triton_without_a_way_to_run_it_is_refused(monkeypatch):
    monkeypatch.setenv("ZERO_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    p, g, m, v = _inputs(10, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="needs TRITON_INTERPRET=1"):
        zk.adam_step(p, g, m, v, lr=1e-3, step=1)
    monkeypatch.setenv("ZERO_KERNELS", "fast")
    with pytest.raises(ValueError, match="ZERO_KERNELS='fast'"):
        zk.adam_step(p, g, m, v, lr=1e-3, step=1)


def test_formula_reference_equals_torch_fused_cpu_kernel():
    """Off CPU the reference is written out; it must agree with the fused CPU kernel used on CPU."""
    from zero_kernels._adam import _adam_formulas

    a = _inputs(1025, torch.bfloat16, "cpu")
    b = [t.clone() for t in a]
    zk.adam_step(*a, lr=1e-2, weight_decay=0.1, step=4, grad_scale=0.25)
    _adam_formulas(*b[:4], None, 1e-2, 0.9, 0.999, 1e-8, 0.1, 1 - 0.9**4, math.sqrt(1 - 0.999**4), 0.25, True)
    for x, y in zip(a, b):
        assert torch.allclose(x.float(), y.float(), rtol=1e-6, atol=1e-7)
