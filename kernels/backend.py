"""The one place that decides which implementation an op runs: the PyTorch reference or a GPU kernel.

`backend` is "auto" (GPU kernels for CUDA tensors when Triton imports, the reference otherwise),
"reference", or "triton" (forced; also runs on CPU tensors under TRITON_INTERPRET=1, which is how
CI tests the kernels without a GPU).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("auto", "reference", "triton")


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(backend: str, tensor: torch.Tensor) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "reference":
        return False
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the `triton` package (pip install triton)")
        if not tensor.is_cuda and not interpreting():
            raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (slow; for tests)")
        return True
    return tensor.is_cuda and triton_available()


def empty_output(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """torch.empty for kernel outputs, filled with NaN when LIT_MATMAMBA_POISON=1 (tests): an element
    a kernel forgets to write then shows up as NaN instead of as plausible garbage."""
    out = torch.empty(shape, device=like.device, dtype=dtype)
    if os.environ.get("LIT_MATMAMBA_POISON", "0") == "1":
        out.fill_(float("nan"))
    return out
