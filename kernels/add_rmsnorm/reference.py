"""Pure-PyTorch residual add + RMSNorm (every block's pre-norm): the CPU path and the oracle for kernels."""

from __future__ import annotations

import torch


def add_rmsnorm_ref(
    x: torch.Tensor | None,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-5,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adds a block's output into the residual stream and normalises the sum, as mamba-ssm's
    `layer_norm_fn(x, weight, None, residual=residual, prenorm=True, residual_in_fp32=True,
    is_rms_norm=True)`:

        residual_out = residual + x
        y = residual_out / sqrt(mean(residual_out^2) + eps) * weight

    Args:
        x: (..., D), the last block's branch output; None for the first block (residual_out = residual).
        residual: (..., D), the residual stream, any float dtype.
        weight: (D,); may be float32 while x is bf16 (autocast keeps float32 weights).
        out_dtype: y's dtype; None: x's dtype (residual's when x is None).

    Returns y (..., D) in out_dtype and residual_out (..., D) in float32 (float64 when an input is
    float64, so that a float64 model keeps its precision); y is computed in residual_out's dtype.
    """
    acc = torch.promote_types(torch.float32, residual.dtype)
    if x is not None:
        acc = torch.promote_types(acc, x.dtype)
    out_dtype = out_dtype or (x.dtype if x is not None else residual.dtype)
    residual_out = residual.to(acc) if x is None else residual.to(acc) + x.to(acc)  # (..., D)
    rstd = torch.rsqrt(residual_out.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
    y = residual_out * rstd * weight.to(acc)  # (..., D)
    return y.to(out_dtype), residual_out
