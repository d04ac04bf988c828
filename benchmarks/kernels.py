"""zero-kernels against torch eager (and torch.compile), as fractions of the device's copy bandwidth.

    python benchmarks/kernels.py [--device cuda|cpu] [--quick] [--no-compile] [--out benchmarks/results]

One unattended script, so it can run on a GPU machine whenever one is lent. For
each op it times zero's dispatching function (Triton on CUDA, the torch reference
elsewhere: torch's built-in op where zero uses one, else the hand-written torch
reference) and torch's own way of doing the same, in the same run, taking turns,
and reports
the speed-up and the achieved bandwidth (bytes the op must move / time) as a
fraction of a plain device-to-device copy measured first. Fused linear +
cross-entropy is reported by peak memory against torch's. Writes
``kernels-<device>.json``.

Targets on an H100/H200: fused AdamW >= 80% of copy bandwidth; norms >= 1.5x
torch eager forward+backward; fused linear + cross-entropy peak memory <= 25% of
torch's.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import zero_kernels as zk


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn: Callable[[], object], device: torch.device, min_time: float = 0.2) -> float:
    """Median seconds per call over enough calls to fill ``min_time``, after warm-up."""
    for _ in range(3):
        fn()
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    once = max(time.perf_counter() - start, 1e-6)
    reps = int(max(5, min(200, min_time / once)))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_pair(ours: Callable[[], object], theirs: Callable[[], object], device: torch.device,
               rounds: int = 3) -> tuple[float, float]:
    """Both medians, taking turns ``rounds`` times and keeping each side's best: a shared
    machine's noise then hits both sides alike instead of whichever ran during a burst."""
    t_ours, t_theirs = [], []
    for _ in range(rounds):
        t_ours.append(bench(ours, device, 0.1))
        t_theirs.append(bench(theirs, device, 0.1))
    return min(t_ours), min(t_theirs)


def _compile(fn: Callable, enabled: bool) -> Callable | None:
    if not enabled:
        return None
    try:
        compiled = torch.compile(fn)
        compiled()
        return compiled
    except Exception as exc:  # torch.compile may be unavailable here: report it, do not fail
        print(f"  torch.compile unavailable here: {type(exc).__name__}: {str(exc)[:100]}")
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes (CPU smoke run)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    big = gpu and not args.quick
    compile_ok = gpu and not args.no_compile
    torch.manual_seed(0)
    rows: list[dict] = []

    # -- the yardstick: a plain copy ------------------------------------------------
    n_copy = (256 if big else 16) * 2**20 // 4
    src, dst = torch.randn(n_copy, device=device), torch.empty(n_copy, device=device)
    t = bench(lambda: dst.copy_(src), device)
    copy_bw = 2 * n_copy * 4 / t
    print(f"device {device} ({torch.cuda.get_device_name(device) if gpu else platform.processor() or 'cpu'}): "
          f"copy bandwidth {copy_bw / 1e9:.1f} GB/s")

    def row(op: str, t_zero: float, t_eager: float, nbytes: float | None, t_compiled: float | None = None,
            **extra: object) -> None:
        r = {"op": op, "zero_ms": t_zero * 1e3, "eager_ms": t_eager * 1e3, "speedup_vs_eager": t_eager / t_zero,
             "compiled_ms": t_compiled * 1e3 if t_compiled else None,
             "speedup_vs_compiled": t_compiled / t_zero if t_compiled else None,
             "bandwidth_fraction_of_copy": nbytes / t_zero / copy_bw if nbytes else None, **extra}
        rows.append(r)

    # -- AdamW over a flat fp32 shard ---------------------------------------------------
    n = (64 if big else 4) * 2**20
    p, g = torch.randn(n, device=device), torch.randn(n, device=device)
    m, v = torch.zeros(n, device=device), torch.zeros(n, device=device)
    low = torch.empty(n, dtype=torch.bfloat16, device=device)
    t_zero = bench(lambda: zk.adam_step(p, g, m, v, lr=1e-3, weight_decay=0.01, step=10), device)
    t_low = bench(lambda: zk.adam_step(p, g, m, v, lr=1e-3, weight_decay=0.01, step=10, lowp_out=low), device)
    ref = torch.nn.Parameter(p.clone())
    ref.grad = g.clone()
    opt = torch.optim.AdamW([ref], lr=1e-3, weight_decay=0.01, foreach=True)
    t_eager = bench(opt.step, device)
    t_fused = None
    if gpu:
        fused = torch.optim.AdamW([ref], lr=1e-3, weight_decay=0.01, fused=True)
        t_fused = bench(fused.step, device)
    row("adamw", t_zero, t_eager, 28 * n, params=n, torch_fused_ms=t_fused * 1e3 if t_fused else None)
    row("adamw+bf16 copy", t_low, t_eager, 30 * n, params=n)

    # -- global grad norm with inf flag ---------------------------------------------------
    grads = [torch.randn(s, device=device) for s in ([2**24] * 4 if big else [2**20] * 4)]
    t_zero, t_eager = bench_pair(lambda: zk.global_grad_norm(grads),
                                 lambda: torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))), device)
    row("grad_norm", t_zero, t_eager, sum(x.numel() for x in grads) * 4)

    # -- norms, forward + backward ---------------------------------------------------------
    m_rows, hidden = (16384, 4096) if big else (2048, 1024)
    dtype = torch.bfloat16 if gpu else torch.float32
    x = torch.randn(m_rows, hidden, device=device, dtype=dtype, requires_grad=True)
    w = torch.ones(hidden, device=device, dtype=dtype, requires_grad=True)
    b = torch.zeros(hidden, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn_like(x)
    io_bytes = 4 * x.numel() * x.element_size()  # read x, write y; read x and dy, write dx
    for name, ours, theirs in [
        ("rms_norm fwd+bwd", lambda: zk.rms_norm(x, w, 1e-6).backward(dy),
         lambda: F.rms_norm(x, (hidden,), w, 1e-6).backward(dy)),
        ("layer_norm fwd+bwd", lambda: zk.layer_norm(x, w, b, 1e-5).backward(dy),
         lambda: F.layer_norm(x, (hidden,), w, b, 1e-5).backward(dy)),
    ]:
        compiled = _compile(theirs, compile_ok)
        row(name, *bench_pair(ours, theirs, device), io_bytes,
            bench(compiled, device) if compiled else None, shape=[m_rows, hidden], dtype=str(dtype))

    # -- rotary embedding, forward + backward ------------------------------------------
    bsz, seq, heads, head_dim = (8, 2048, 32, 128) if big else (2, 256, 8, 64)
    q = torch.randn(bsz, seq, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    dq = torch.randn_like(q)
    cos, sin = zk.rotary_tables(seq, head_dim, device=device, dtype=torch.float32)

    def eager_rope() -> None:
        half = head_dim // 2
        q1, q2 = q[..., :half], q[..., half:]
        c, s = cos[:, None, :].to(dtype), sin[:, None, :].to(dtype)
        torch.cat([q1 * c - q2 * s, q2 * c + q1 * s], dim=-1).backward(dq)

    compiled = _compile(eager_rope, compile_ok)
    row("rope fwd+bwd", *bench_pair(lambda: zk.apply_rotary(q, cos, sin).backward(dq), eager_rope, device),
        4 * q.numel() * q.element_size(), bench(compiled, device) if compiled else None)

    # -- blockwise int8 quantisation -----------------------------------------------------------
    xq = torch.randn((64 if big else 4) * 2**20, device=device)

    def eager_quant() -> None:
        rows_ = xq.view(-1, 256)
        scale = rows_.abs().amax(1, keepdim=True) / 127
        (rows_ / scale).round().clamp(-127, 127).to(torch.int8)

    row("quantize_int8", *bench_pair(lambda: zk.quantize_int8(xq), eager_quant, device), xq.numel() * 5)

    # -- fused linear + cross-entropy: memory is the point ---------------------------------
    tokens, hidden, vocab = (8192, 4096, 50257) if big else (2048, 64, 50257)
    xs = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    wv = (torch.randn(vocab, hidden, device=device, dtype=dtype) * hidden**-0.5).requires_grad_()
    tgt = torch.randint(0, vocab, (tokens,), device=device)

    def ours() -> None:
        zk.fused_linear_cross_entropy(xs, wv, tgt).backward()

    def theirs() -> None:
        F.cross_entropy((xs @ wv.t()).float(), tgt).backward()

    peak_ours, peak_theirs = zk.peak_memory(ours, device), zk.peak_memory(theirs, device)
    row("linear+cross_entropy", bench(ours, device, 0.5), bench(theirs, device, 0.5), None,
        peak_mib=peak_ours / 2**20, torch_peak_mib=peak_theirs / 2**20, peak_fraction=peak_ours / peak_theirs,
        shape=[tokens, hidden, vocab])

    # -- report ------------------------------------------------------------------------
    print(f"\n{'op':<22}{'zero ms':>10}{'eager ms':>10}{'x eager':>9}{'x compile':>11}{'of copy BW':>12}")
    for r in rows:
        sc = f"{r['speedup_vs_compiled']:.2f}" if r["speedup_vs_compiled"] else "-"
        bw = f"{100 * r['bandwidth_fraction_of_copy']:.0f}%" if r["bandwidth_fraction_of_copy"] else "-"
        print(f"{r['op']:<22}{r['zero_ms']:>10.3f}{r['eager_ms']:>10.3f}{r['speedup_vs_eager']:>9.2f}{sc:>11}{bw:>12}")
    ce = rows[-1]
    print(f"linear+cross_entropy peak memory: {ce['peak_mib']:.0f} MiB vs torch {ce['torch_peak_mib']:.0f} MiB "
          f"({100 * ce['peak_fraction']:.1f}%)")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"kernels-{device.type}.json"
    meta = {"device": torch.cuda.get_device_name(device) if gpu else "cpu", "torch": torch.__version__,
            "copy_bandwidth_GBps": copy_bw / 1e9, "paths": "triton" if zk.use_triton(torch.empty(0, device=device))
            else "reference", "quick": not big}
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
