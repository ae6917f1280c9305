"""What the kernel tests share: devices, tolerances, skip marks and the float64-oracle comparison.

Without CUDA the kernels run under the Triton interpreter (conftest.py sets TRITON_INTERPRET=1 before
anything imports triton), so shapes stay tiny. The oracle is the reference run in float64 on the
same (rounded) inputs, so bf16 results may differ from it by their output rounding.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from types import SimpleNamespace

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
requires_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed (pip install triton)"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    """Elementwise, with an absolute tolerance relative to the tensor's scale."""
    assert actual.shape == expected.shape, name
    rtol = RTOL[dtype]
    atol = rtol * max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}"
    )


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_()


def as_float64(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [leaf(t.double()) for t in tensors]


@pytest.fixture
def mamba_ssm_kernels(monkeypatch):
    """mamba-ssm's Triton SSD kernels, ready to run here; skips where mamba-ssm is not installed
    (CI installs it, so CI runs these tests).

    On CPU they run under the Triton interpreter, with three test-only shims: mamba-ssm enters
    `torch.cuda.device(x.device.index)` and asks for the SM count, which fail without a CUDA
    driver, and its autotuner benchmarks several configs, which needs one. So the device context is
    a no-op, the SM count a small number, and each autotuned kernel keeps its first config.
    """
    from lit_matmamba.kernels import mamba_ssm_compat

    try:
        internals = mamba_ssm_compat.get_ssd_internals()
    except ImportError as e:
        pytest.skip(f"needs mamba-ssm's Triton kernels: {e}")
    if torch.cuda.is_available():
        return
    from triton.runtime.autotuner import Autotuner

    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=4)
    )
    for module in {fn.__module__ for fn in vars(internals).values()}:
        for obj in vars(sys.modules[module]).values():
            if isinstance(obj, Autotuner):
                monkeypatch.setattr(obj, "configs", obj.configs[:1])
