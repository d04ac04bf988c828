"""Each kernel test runs on every path: the hand-written torch reference, what CPU tensors
get by default (torch's built-in ops where zero uses them), and the Triton kernel (on CUDA
when present, else on CPU under TRITON_INTERPRET=1 -- the nox `kernels` session)."""

import os

import pytest
import torch


def _triton_device() -> str | None:
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    return None


@pytest.fixture(params=["reference", "cpu-default", pytest.param("triton", marks=pytest.mark.triton)])
def path(request, monkeypatch) -> str:
    """The implementation under test; yields the device its tensors live on."""
    if request.param == "triton":
        device = _triton_device()
        if device is None:
            pytest.skip("the Triton path runs in `nox -s kernels` (TRITON_INTERPRET=1) or on a GPU")
        monkeypatch.setenv("ZERO_KERNELS", "triton")
        return device
    if request.param == "cpu-default":
        monkeypatch.delenv("ZERO_KERNELS", raising=False)
        return "cpu"
    monkeypatch.setenv("ZERO_KERNELS", "reference")
    return "cpu"
