"""Residual add + RMSNorm of the pre-norm residual stack, fused (mamba-ssm's `prenorm=True`)."""

from __future__ import annotations

import torch

from ..backend import use_triton
from .reference import add_rmsnorm_ref

__all__ = ["add_rmsnorm", "add_rmsnorm_ref"]


def add_rmsnorm(
    x: torch.Tensor | None,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-5,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, residual_out); see `add_rmsnorm_ref` for shapes and dtypes."""
    if use_triton(backend, residual):
        from .kernel import add_rmsnorm_triton

        return add_rmsnorm_triton(x, residual, weight, eps, out_dtype)
    return add_rmsnorm_ref(x, residual, weight, eps, out_dtype)
