"""Pure-PyTorch causal depthwise conv1d (+ SiLU): the CPU path and the oracle for the Triton kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    activation: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise convolution over time.

    Args:
        x: (B, L, C) input, channels last (as it comes out of in_proj).
        weight: (C, K) one filter per channel; `weight[:, -1]` multiplies the current step.
        bias: (C,) or None.
        initial_state: (B, C, K-1) the K-1 inputs before x[:, 0] (zeros when None).
        activation: apply SiLU to the output.

    Returns:
        y: (B, L, C) in x's dtype.
        final_state: (B, C, K-1) the last K-1 inputs, to continue the sequence (decoding).
    """
    bsz, seqlen, channels = x.shape
    k = weight.shape[-1]
    xt = x.transpose(1, 2)  # (B, C, L)
    if initial_state is None:
        initial_state = xt.new_zeros(bsz, channels, k - 1)
    padded = torch.cat([initial_state.to(xt.dtype), xt], dim=-1)  # (B, C, K-1+L)
    y = F.conv1d(
        padded,
        weight.unsqueeze(1).to(xt.dtype),
        bias.to(xt.dtype) if bias is not None else None,
        groups=channels,
    )  # (B, C, L)
    if activation:
        y = F.silu(y)
    final_state = padded[:, :, padded.shape[-1] - (k - 1) :]  # (B, C, K-1)
    return y.transpose(1, 2), final_state


def causal_conv1d_step_ref(
    x: torch.Tensor,
    state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step. x: (B, C); state: (B, C, K-1). Returns y (B, C) and the new state."""
    window = torch.cat([state.to(x.dtype), x.unsqueeze(-1)], dim=-1)  # (B, C, K)
    y = (window * weight.to(x.dtype)).sum(-1)
    if bias is not None:
        y = y + bias.to(x.dtype)
    if activation:
        y = F.silu(y)
    return y, window[:, :, 1:]
