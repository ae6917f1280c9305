"""Causal depthwise conv1d + SiLU over the nested channel subset of a MatMamba mixer."""

from __future__ import annotations

import torch

from ..backend import use_triton
from .reference import causal_conv1d_ref, causal_conv1d_step_ref

__all__ = ["causal_conv1d", "causal_conv1d_ref", "causal_conv1d_step", "causal_conv1d_step_ref"]


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    activation: bool = True,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """See `causal_conv1d_ref` for shapes. `weight` and `bias` may be prefix views of larger ones."""
    if use_triton(backend, x):
        from .kernel import causal_conv1d_triton

        return causal_conv1d_triton(x, weight, bias, initial_state, activation)
    return causal_conv1d_ref(x, weight, bias, initial_state, activation)


def causal_conv1d_step(
    x: torch.Tensor,
    state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: bool = True,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step (see `causal_conv1d_step_ref` for shapes): y and the new state. The Triton
    kernel writes the new state into `state` and returns it; the reference returns a new tensor.
    Either way, use the state returned."""
    if use_triton(backend, x):
        from .kernel import causal_conv1d_step_triton

        return causal_conv1d_step_triton(x, state, weight, bias, activation)
    return causal_conv1d_step_ref(x, state, weight, bias, activation)
