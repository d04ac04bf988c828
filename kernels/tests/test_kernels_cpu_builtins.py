"""CPU tensors run torch's built-in ops (F.layer_norm, F.rms_norm, torch._foreach_norm, a shorter
quantisation formula), which give the hand-written reference's results: same dtypes and shapes,
values within rounding (bit for bit for int8 quantisation), gradients included, same errors."""

import pytest
import torch
import torch.nn.functional as F

import zero_kernels as zk
from zero_kernels import _grad_norm, _norms, _quant
from zero_kernels._dispatch import kernel_path

# one or two rounding steps of the dtype: the built-ins round intermediate results differently
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _rel(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-12)).item()


def _on(path, monkeypatch, fn, *args):
    if path == "auto":
        monkeypatch.delenv("ZERO_KERNELS", raising=False)
    else:
        monkeypatch.setenv("ZERO_KERNELS", path)
    return fn(*args)


def test_cpu_tensors_take_the_torch_path_by_default(monkeypatch):
    monkeypatch.delenv("ZERO_KERNELS", raising=False)
    x = torch.randn(4, 8)
    assert kernel_path(x) == "torch" and not zk.use_triton(x)
    called = []

    def spy(name, fn):
        def wrapped(*a, **k):
            called.append(name)
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(F, "layer_norm", spy("layer_norm", F.layer_norm))
    monkeypatch.setattr(F, "rms_norm", spy("rms_norm", F.rms_norm))
    monkeypatch.setattr(_grad_norm, "_builtin", spy("grad_norm", _grad_norm._builtin))
    monkeypatch.setattr(_quant, "_quantize_builtin", spy("quantize", _quant._quantize_builtin))
    monkeypatch.setattr(_quant, "_dequantize_builtin", spy("dequantize", _quant._dequantize_builtin))
    monkeypatch.setattr(_norms._Norm, "apply", spy("reference norm", _norms._Norm.apply))
    w, b = torch.ones(8), torch.zeros(8)
    zk.layer_norm(x, w, b)
    zk.rms_norm(x, w)
    zk.global_grad_norm([x])
    zk.dequantize_int8(*zk.quantize_int8(x, 16), 16)
    assert called == ["layer_norm", "rms_norm", "grad_norm", "quantize", "dequantize"]
    zk.layer_norm(x, w.double(), b.double())  # mixed dtypes: torch's op would answer in another dtype
    assert called[-1] == "reference norm"


def test_forcing_a_path_and_a_bad_choice(monkeypatch):
    x = torch.randn(3)
    for choice in ("reference", "torch"):
        monkeypatch.setenv("ZERO_KERNELS", choice)
        assert kernel_path(x) == choice
    monkeypatch.setenv("ZERO_KERNELS", "fast")
    with pytest.raises(ValueError, match="expected one of reference, torch, triton, auto"):
        kernel_path(x)


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("kind", ["rms", "layer", "layer_no_bias"])
@pytest.mark.parametrize("shape", [(5, 33), (2, 3, 1000), (0, 16)], ids=str)
def test_norm_builtin_equals_reference_with_gradients(monkeypatch, dtype, kind, shape):
    g = torch.Generator().manual_seed(3)
    n = shape[-1]
    x = (torch.randn(shape, generator=g) * 3 + 1).to(dtype)
    w = (torch.rand(n, generator=g) + 0.5).to(dtype)
    b = (torch.randn(n, generator=g) * 0.1).to(dtype) if kind == "layer" else None
    dy = torch.randn(shape, generator=g).to(dtype)

    def run():
        xt, wt = x.clone().requires_grad_(), w.clone().requires_grad_()
        bt = b.clone().requires_grad_() if b is not None else None
        y = zk.rms_norm(xt, wt, 1e-6) if kind == "rms" else zk.layer_norm(xt, wt, bt, 1e-5)
        y.backward(dy)
        return [y, xt.grad, wt.grad] + ([bt.grad] if bt is not None else [])

    ref = _on("reference", monkeypatch, run)
    got = _on("auto", monkeypatch, run)
    if not x.numel():
        assert all(g.shape == r.shape and g.dtype == r.dtype for g, r in zip(got, ref))
        return
    for name, a, r in zip(["output", "input grad", "weight grad", "bias grad"], got, ref):
        assert _rel(a, r) <= TOL[dtype] * (1 if name == "output" else 4), name


def test_norm_errors_are_the_same_on_every_path(monkeypatch):
    for path in ("reference", "auto"):
        with pytest.raises(ValueError, match=r"weight/bias must have shape \(8,\) to normalise a last dimension"):
            _on(path, monkeypatch, zk.layer_norm, torch.randn(2, 8), torch.ones(8), torch.ones(4))
        with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
            _on(path, monkeypatch, zk.rms_norm, torch.randn(2, 8), torch.ones(8, 1))


@pytest.mark.parametrize("poison", [None, float("inf"), float("nan"), "overflow"])
def test_grad_norm_builtin_equals_reference(monkeypatch, poison):
    g = torch.Generator().manual_seed(5)
    tensors = [torch.randn(n, generator=g).to(dt) for n, dt in
               [(1000, torch.float32), (0, torch.float32), (333, torch.bfloat16), (77, torch.float16),
                (4099, torch.float32)]]
    if poison == "overflow":
        tensors[0][:4] = 1e20  # finite, but its square is not
    elif poison is not None:
        tensors[2][7] = poison
    (s_ref, bad_ref) = _on("reference", monkeypatch, zk.grad_norm_sq, tensors)
    (s_got, bad_got) = _on("auto", monkeypatch, zk.grad_norm_sq, tensors)
    assert s_got.dtype == s_ref.dtype == torch.float32 and s_got.shape == s_ref.shape == ()
    assert bad_got.dtype == torch.bool and bad_got.shape == () and bad_got.item() == bad_ref.item()
    assert bad_ref.item() == (poison not in (None, "overflow"))
    if poison is None:
        assert abs(s_got.item() - s_ref.item()) <= 1e-6 * s_ref.item()
    else:
        assert not torch.isfinite(s_got) and not torch.isfinite(s_ref)


def test_grad_norm_errors_are_the_same_on_every_path(monkeypatch):
    for path in ("reference", "auto"):
        with pytest.raises(ValueError, match=r"tensors\[1\] must be floating point, got torch\.int64"):
            _on(path, monkeypatch, zk.grad_norm_sq, [torch.ones(2), torch.ones(2, dtype=torch.long)])
        with pytest.raises(ValueError, match="needs at least one tensor"):
            _on(path, monkeypatch, zk.grad_norm_sq, [])
        with pytest.raises(RuntimeError, match="without narrowing"):  # fp64: torch's own refusal, on both
            _on(path, monkeypatch, zk.grad_norm_sq, [torch.ones(2), torch.ones(2, dtype=torch.float64)])


@pytest.mark.parametrize("n", [0, 1, 15, 256, 257, 4099])
@pytest.mark.parametrize("block", [16, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_int8_builtin_is_the_reference_bit_for_bit(monkeypatch, n, block, dtype):
    g = torch.Generator().manual_seed(n + block)
    x = (torch.randn(n, generator=g) * torch.logspace(-30, 30, n)).to(dtype)
    if n > 300:
        x[3], x[100], x[1024:1040] = float("nan"), float("inf"), 0.0  # NaN/inf blocks, a zero block
    x = x.view(-1, 1) if n else x
    q_ref, s_ref = _on("reference", monkeypatch, zk.quantize_int8, x, block)
    q_got, s_got = _on("auto", monkeypatch, zk.quantize_int8, x, block)
    assert q_got.dtype == torch.int8 and s_got.dtype == torch.float32
    assert q_got.shape == q_ref.shape and s_got.shape == s_ref.shape
    finite = torch.isfinite(s_ref)  # a block holding inf quantises inf/inf: NaN cast to int8, unspecified
    per_element = finite.repeat_interleave(block)[:n]
    assert torch.equal(q_got[per_element], q_ref[per_element])
    assert torch.equal(s_got.nan_to_num(), s_ref.nan_to_num())
    for out in (torch.float32, torch.bfloat16):
        d_ref = _on("reference", monkeypatch, zk.dequantize_int8, q_ref, s_ref, block, out)
        d_got = _on("auto", monkeypatch, zk.dequantize_int8, q_ref, s_ref, block, out)
        assert d_got.dtype == out and torch.equal(d_got.nan_to_num(), d_ref.nan_to_num())


def test_int8_errors_are_the_same_on_every_path(monkeypatch):
    for path in ("reference", "auto"):
        with pytest.raises(ValueError, match="power of two >= 16, got 24"):
            _on(path, monkeypatch, zk.quantize_int8, torch.zeros(10), 24)
        with pytest.raises(ValueError, match=r"needs a floating-point tensor, got torch\.int32"):
            _on(path, monkeypatch, zk.quantize_int8, torch.zeros(10, dtype=torch.int32))
        with pytest.raises(ValueError, match="3 scales do not match 10 values in blocks of 16"):
            _on(path, monkeypatch, zk.dequantize_int8, torch.zeros(10, dtype=torch.int8), torch.ones(3), 16)
