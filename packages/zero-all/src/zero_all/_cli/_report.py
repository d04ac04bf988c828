"""``zero report``: what this machine can run -- versions, devices, backends, kernels, offload stores.

Every probe answers for this machine and this environment by trying the thing
(importing triton, pinning a page, an ``O_DIRECT`` write), not by reading a
build flag, so the report says what a job started here would get.
"""

from __future__ import annotations

import errno
import os
import platform
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import zero_kernels
from zero_offload import ALIGN, aligned_empty

__all__ = ["collect_report", "format_report"]

LIBRARIES = ("torch", "triton", "numpy", "msgspec", "safetensors")
ZERO_PACKAGES = ("zero-comm", "zero-kernels", "zero-optim", "zero-offload", "zero-ckpt", "zero-pipe", "zero-all")


def _version(dist_name: str) -> str | None:
    try:
        return metadata.version(dist_name)
    except metadata.PackageNotFoundError:
        return None


def _devices() -> dict[str, Any]:
    cuda = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            cuda.append({"index": i, "name": props.name, "memory_bytes": props.total_memory,
                         "capability": f"{props.major}.{props.minor}"})
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu_count": os.cpu_count(), "cpus_usable": affinity, "platform": platform.platform(),
            "cuda_available": torch.cuda.is_available(), "cuda_version": torch.version.cuda, "cuda": cuda}


def _backends() -> dict[str, bool]:
    if not dist.is_available():
        return {"gloo": False, "nccl": False, "mpi": False}
    return {"gloo": dist.is_gloo_available(), "nccl": dist.is_nccl_available(), "mpi": dist.is_mpi_available()}


def _kernels() -> dict[str, Any]:
    """Which implementation zero-kernels' dispatch (``use_triton``) picks for tensors on each device."""
    try:
        import triton  # noqa: F401

        triton_error = None
    except ImportError as exc:
        triton_error = str(exc)

    def path(device: str) -> str:
        try:
            return "triton" if zero_kernels.use_triton(torch.empty(1, device=device)) else "torch reference"
        except (RuntimeError, ValueError) as exc:
            return f"error: {exc}"

    return {
        "ops": [n for n in zero_kernels.__all__ if n not in ("use_triton", "peak_memory")],
        "triton_importable": triton_error is None, "triton_error": triton_error,
        "interpreter": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "forced": os.environ.get("ZERO_KERNELS"),
        "cpu_tensors": path("cpu"),
        "cuda_tensors": path("cuda") if torch.cuda.is_available() else "no CUDA device",
    }


def _pinned() -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"usable": True, "pinned": False,
                "note": "no CUDA device: HostStore keeps plain host memory (nothing to pin for)"}
    try:
        torch.empty(ALIGN, dtype=torch.uint8, pin_memory=True)
    except RuntimeError as exc:
        return {"usable": True, "pinned": False, "note": f"pinning failed: {exc}"}
    return {"usable": True, "pinned": True, "note": "page-locked host memory: asynchronous copies to the GPU"}


def probe_direct_io(directory: str | Path) -> dict[str, Any]:
    """Write and read back one aligned block with ``O_DIRECT`` in ``directory``."""
    directory = Path(directory)
    out: dict[str, Any] = {"path": str(directory)}
    flag = getattr(os, "O_DIRECT", 0)
    if not directory.is_dir() or not os.access(directory, os.W_OK):
        return {**out, "usable": False, "direct": False, "note": "not a writable directory"}
    if not flag:
        return {**out, "usable": True, "direct": False, "note": "this OS has no O_DIRECT: buffered I/O"}
    probe = directory / f".zero-report-probe-{os.getpid()}"
    buf = aligned_empty(ALIGN)
    buf.fill_(0x5A)
    back = aligned_empty(ALIGN)
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_TRUNC | flag, 0o600)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return {**out, "usable": True, "direct": False,
                    "note": "the filesystem refuses O_DIRECT (tmpfs?): NVMeStore falls back to buffered I/O"}
        return {**out, "usable": False, "direct": False, "note": f"cannot create a file: {exc.strerror}"}
    try:
        os.pwritev(fd, [buf.numpy().data], 0)
        os.preadv(fd, [back.numpy().data], 0)
        same = bool(torch.equal(buf, back))
    except OSError as exc:
        return {**out, "usable": True, "direct": False, "note": f"O_DIRECT write failed: {exc.strerror}"}
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)
    if not same:
        return {**out, "usable": False, "direct": True, "note": "an O_DIRECT block read back different bytes"}
    return {**out, "usable": True, "direct": True, "note": f"O_DIRECT write and read of {ALIGN} bytes"}


def collect_report(nvme_path: str | None = None) -> dict[str, Any]:
    """Everything ``zero report`` prints, as plain data (its ``--json``)."""
    libraries = {name: _version(name) for name in LIBRARIES}
    packages = {name: _version(name) for name in ZERO_PACKAGES}
    if nvme_path is None:
        nvme_path = tempfile.gettempdir()
    return {
        "python": sys.version.split()[0], "executable": sys.executable, "libraries": libraries,
        "zero_packages": packages, "devices": _devices(), "distributed_backends": _backends(),
        "kernels": _kernels(),
        "offload": {"host_store": _pinned(), "nvme_store": probe_direct_io(nvme_path)},
    }


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def format_report(r: dict[str, Any]) -> str:
    def missing(v: str | None) -> str:
        return v if v is not None else "not installed"

    lines = ["versions", f"  python        {r['python']} ({r['executable']})"]
    lines += [f"  {k:<13} {missing(v)}" for k, v in r["libraries"].items()]
    lines += [f"  {k:<13} {missing(v)}" for k, v in r["zero_packages"].items()]
    d = r["devices"]
    lines += ["devices", f"  cpu           {d['cpu_count']} cores ({d['cpus_usable']} usable by this process)"]
    if d["cuda"]:
        lines += [f"  cuda:{g['index']}        {g['name']}, {_gib(g['memory_bytes'])}, sm {g['capability']}"
                  for g in d["cuda"]]
    else:
        lines.append("  cuda          none" + (f" (torch built for CUDA {d['cuda_version']})"
                                               if d["cuda_version"] else " (CPU build of torch)"))
    b = r["distributed_backends"]
    lines += ["torch.distributed backends",
              "  " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in b.items())]
    k = r["kernels"]
    triton = "importable" if k["triton_importable"] else f"not importable ({k['triton_error']})"
    lines += ["zero-kernels", f"  triton        {triton}",
              f"  interpreter   {'on (TRITON_INTERPRET=1)' if k['interpreter'] else 'off'}"
              + (f"; ZERO_KERNELS={k['forced']}" if k["forced"] else ""),
              f"  CPU tensors   {k['cpu_tensors']}", f"  CUDA tensors  {k['cuda_tensors']}",
              f"  ops           {', '.join(k['ops'])}"]
    o = r["offload"]
    h, n = o["host_store"], o["nvme_store"]
    lines += ["offload stores", f"  HostStore     {'usable' if h['usable'] else 'unusable'}: {h['note']}",
              f"  NVMeStore     {'usable' if n['usable'] else 'unusable'} in {n['path']}: {n['note']}"]
    return "\n".join(lines)
