"""Gated RMSNorm of the Mamba2 mixer, at any nested width."""

from __future__ import annotations

import torch

from ..backend import use_triton
from .reference import gated_rmsnorm_ref

__all__ = ["gated_rmsnorm", "gated_rmsnorm_ref"]


def gated_rmsnorm(
    x: torch.Tensor,
    z: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float = 1e-5,
    group_size: int | None = None,
    norm_before_gate: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """See `gated_rmsnorm_ref` for shapes."""
    if use_triton(backend, x):
        from .kernel import gated_rmsnorm_triton

        return gated_rmsnorm_triton(x, z, weight, eps, group_size, norm_before_gate)
    return gated_rmsnorm_ref(x, z, weight, eps, group_size, norm_before_gate)
