"""Peak memory of a call, on the device it runs on, for tests and benchmarks."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["peak_memory"]


def peak_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Bytes allocated at the peak of ``fn()``, above what was allocated when it started.

    CUDA: the caching allocator's own peak counter. CPU: every allocation and free
    the torch profiler records (its ``[memory]`` events, with their byte counts),
    replayed in time order.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return peak
