"""The one place that decides which implementation an op runs: the PyTorch reference or a GPU kernel.

`backend` is "auto" (GPU kernels for CUDA tensors when Triton imports, the reference otherwise),
"reference", or "triton" (forced; also runs on CPU tensors when Triton runs kernels in its
interpreter, TRITON_INTERPRET=1, which is how CI tests the kernels without a GPU).
"""

from __future__ import annotations

import functools
import importlib.util

import torch

BACKENDS = ("auto", "reference", "triton")


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter, as Triton itself decides it (its knob follows
    TRITON_INTERPRET and can be set in code). Triton older than 3.4 has no knobs: False there."""
    import triton

    knobs = getattr(triton, "knobs", None)
    return bool(knobs is not None and knobs.runtime.interpret)


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
    """An uninitialised kernel output on `like`'s device. Every kernel allocates its outputs here, and
    kernel modules call it through this module (`backend.empty_output`), so that the tests' fixture
    `poisoned_outputs` can fill them with NaN in one place."""
    return torch.empty(shape, device=like.device, dtype=dtype)
