"""The GPU SSD scan: mamba-ssm's Triton kernel behind the signature of `ssd_ref`.

mamba_chunk_scan_combined (mamba_ssm/ops/triton/ssd_combined.py, state-spaces/mamba 2.2.x/2.3.x):
    mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None,
        initial_states=None, seq_idx=None, cu_seqlens=None, dt_softplus=False,
        dt_limit=(0.0, float("inf")), return_final_states=False, return_varlen_states=False)
returns `out` or `(out, final_states)`; final_states (b, h, p, n) is float32. Arguments are passed by
keyword, so the adapter also fits 2.0.x/2.1.x, which lack cu_seqlens and return_varlen_states.
Its autograd covers x, dt, A, B, C, D, dt_bias and initial_states, and the gradient of final_states.
"""

from __future__ import annotations

import torch

from ..mamba_ssm_compat import get_mamba_chunk_scan_combined


def ssd_triton(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """`ssd_ref` on mamba-ssm's kernels: y (b, l, h, p) in x's dtype, final_state (b, h, p, n) float32.

    CUDA tensors only (mamba-ssm's kernels call torch.cuda); raises ImportError when mamba-ssm is missing.
    """
    scan = get_mamba_chunk_scan_combined()
    y, final_state = scan(
        x,
        dt,
        A,
        B,
        C,
        chunk_size,
        D=D,
        z=None,
        dt_bias=dt_bias,
        initial_states=initial_state,
        dt_softplus=dt_softplus,
        return_final_states=True,
    )
    return y, final_state
