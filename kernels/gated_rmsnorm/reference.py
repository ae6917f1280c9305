"""Pure-PyTorch gated RMSNorm (Mamba2's norm): the CPU path and the oracle for kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gated_rmsnorm_ref(
    x: torch.Tensor,
    z: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float = 1e-5,
    group_size: int | None = None,
    norm_before_gate: bool = False,
) -> torch.Tensor:
    """RMSNorm of x gated by SiLU(z), normalised in groups of `group_size` channels.

    Args:
        x, z: (..., C). z may be None (plain RMSNorm).
        weight: (C,).
        group_size: channels per normalisation group (C when None); Mamba2 uses C / ngroups.
        norm_before_gate: False (Mamba2's default) computes norm(x * silu(z)) * weight.

    Computed in float32, returned in x's dtype.
    """
    dtype = x.dtype
    channels = x.shape[-1]
    group_size = group_size or channels
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if z is not None:
        zf = z.to(xf.dtype)
        if not norm_before_gate:
            xf = xf * F.silu(zf)
    xg = xf.unflatten(-1, (channels // group_size, group_size))  # (..., G, C/G)
    rstd = torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + eps)
    out = (xg * rstd).flatten(-2) * weight.to(xf.dtype)
    if z is not None and norm_before_gate:
        out = out * F.silu(zf)
    return out.to(dtype)
