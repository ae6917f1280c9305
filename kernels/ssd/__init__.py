"""The SSD scan of Mamba2 at any nested width."""

from __future__ import annotations

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
    if use_triton(backend, x):
        from .kernel import ssd_triton

        return ssd_triton(x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, initial_state)
    return ssd_ref(x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, initial_state)


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
