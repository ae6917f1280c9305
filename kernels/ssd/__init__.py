"""The SSD scan of Mamba2 at any nested width."""

from __future__ import annotations

import functools
import importlib.util
import warnings

import torch

from ..backend import use_triton
from .reference import ssd_ref, ssd_step_ref

__all__ = ["ssd_scan", "ssd_ref", "ssd_step", "ssd_step_ref"]


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    initial_state: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """See `ssd_ref` for shapes. The GPU path is mamba-ssm's Triton SSD kernel."""
    if use_triton(backend, x) and (backend == "triton" or _mamba_ssm_installed()):
        from .kernel import ssd_triton

        return ssd_triton(x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, initial_state)
    return ssd_ref(x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, initial_state)


@functools.cache
def _mamba_ssm_installed() -> bool:
    """backend="auto" on CUDA without mamba-ssm falls back to the reference scan, once with a warning."""
    if importlib.util.find_spec("mamba_ssm") is not None:
        return True
    warnings.warn(
        "mamba-ssm is not installed: the SSD scan runs the PyTorch reference on the GPU (slow). "
        "Install it for the fast path (see README, GPU install).",
        stacklevel=3,
    )
    return False


def ssd_step(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    state: torch.Tensor,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One recurrent decoding step (see `ssd_step_ref`)."""
    return ssd_step_ref(x, dt, A, B, C, state, D, dt_bias, dt_softplus)
