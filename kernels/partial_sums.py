"""Column sums of per-program partial sums (R, N) -> (N,), as the norm kernels' weight gradients
need them: deterministic (a fixed order, no atomics), in the partial sums' dtype (float32, or
float64 for float64 inputs).

Why not `parts.sum(0)`: PyTorch's reduction over the leading dim of such a tensor is slow for its
size, and a joint step of lm-1.4b runs 388 of them (e.g. (512, 2048) float32, 4 MB). On an H200, at
every shape a joint step sums, it takes 22 to 24 us against 7 to 10 us here (docs/performance.md).
Here each program sums a strip of BLOCK_C columns down all rows, its loads pipelined by Triton a few
tiles ahead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import backend

_BLOCK_R, _BLOCK_C = 128, 32  # a (128, 32) float32 tile: one 128-byte line a row, 16 KB a stage


@triton.jit
def _sum_rows_kernel(parts_ptr, out_ptr, R, N, stride_r, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < N
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=parts_ptr.dtype.element_ty)
    for r0 in tl.range(0, R, BLOCK_R, num_stages=3):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask = (rows < R)[:, None] & col_mask[None, :]
        acc += tl.load(parts_ptr + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + cols, tl.sum(acc, axis=0), mask=col_mask)


def sum_rows(parts: torch.Tensor) -> torch.Tensor:
    """(R, N) float32 or float64 with unit column stride -> (N,) in its dtype: parts.sum(0)."""
    if parts.dim() != 2 or parts.dtype not in (torch.float32, torch.float64) or parts.stride(1) != 1:
        raise ValueError(
            f"sum_rows takes a (R, N) float32/float64 tensor with unit column stride, got {parts.dtype} "
            f"{tuple(parts.shape)} strides {parts.stride()}"
        )
    rows, cols = parts.shape
    out = backend.empty_output((cols,), parts, parts.dtype)  # (N,)
    _sum_rows_kernel[(triton.cdiv(cols, _BLOCK_C),)](
        parts, out, rows, cols, parts.stride(0), BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C, num_warps=4
    )
    return out
