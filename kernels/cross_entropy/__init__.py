"""Cross-entropy of the LM loss on (rows, vocab) logits, without an fp32 copy of the logits."""

from __future__ import annotations

import torch

from ..backend import use_triton
from .reference import cross_entropy_ref

__all__ = ["cross_entropy", "cross_entropy_ref"]


def _check_inputs(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(
            f"logits must be a 2-D float tensor (rows, vocab), got {tuple(logits.shape)} {logits.dtype}"
        )
    if logits.shape[1] == 0:
        raise ValueError("logits has an empty vocabulary dim")
    if target.dim() != 1 or target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(
            f"target must be a 1-D integer tensor of class indices, got {tuple(target.shape)} {target.dtype}"
        )
    if target.shape[0] != logits.shape[0]:
        raise ValueError(f"target has {target.shape[0]} entries for {logits.shape[0]} rows of logits")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device}, logits on {logits.device}")


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    backend: str = "auto",
    reduction: str = "mean",
) -> torch.Tensor:
    """Mean cross-entropy over the rows not ignored, a 0-d float32 tensor; with reduction "none" the
    per-row losses (N,), 0 for ignored rows. logits (N, V) in any float dtype, target (N,) integer.
    See `cross_entropy_ref`."""
    _check_inputs(logits, target)
    if reduction not in ("mean", "none"):
        raise ValueError(f'reduction must be "mean" or "none", got {reduction!r}')
    if use_triton(backend, logits):
        from .kernel import cross_entropy_triton

        return cross_entropy_triton(logits, target, ignore_index, reduction=reduction)
    return cross_entropy_ref(logits, target, ignore_index, reduction)
