"""Triton residual add + RMSNorm, forward and backward; semantics of `add_rmsnorm_ref`.

x and residual are flattened to rows (M, D) with `reshape` (a view when their leading dims merge; a
copy otherwise, or when the last dim is strided); the kernels read any row stride. All arithmetic is
in residual_out's dtype (float32, or float64 for float64 inputs).

Forward: one program per block of BLOCK_M rows holds a (BLOCK_M, D) tile, D padded to a power of 2;
it writes residual_out, y (out_dtype, e.g. bf16 for the next matmul under autocast) and the
reciprocal RMS per row (M,). Backward: a fixed number of programs each walk a contiguous range of
rows in (BLOCK_M, D) tiles, recomputing the normalised rows from the saved residual_out, and write
the gradient of the sum (dy through the norm, plus the gradient of residual_out) once per input
dtype: one tensor serves as both x's and residual's gradient when their dtypes agree. dweight is
summed per program and the partial sums are reduced by `partial_sums.sum_rows` (deterministic, no
atomics).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import backend
from ..partial_sums import sum_rows

# A row must fit in one program's registers; 64 KiB of float32 statistics per row, like the
# gated_rmsnorm kernel (D <= 16384 in float32).
_MAX_FUSED_BYTES = 65536
# Elements of a program's (BLOCK_M, D) tile: small rows are batched so that a program keeps enough
# loads in flight. Chosen on an H200 (bf16 x, fp32 residual, D 768..8192) with 8 warps a tile.
_FWD_TILE = 2048
_BWD_TILE = 8192


@triton.jit
def _add_rmsnorm_fwd_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    y_ptr,
    res_out_ptr,
    rstd_ptr,
    M,
    N,
    eps,
    stride_xm,
    stride_rm,
    stride_w,
    stride_ym,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_X: tl.constexpr,
):
    acc_dtype = res_out_ptr.dtype.element_ty
    # int64 row offsets: M * stride may exceed 2**31
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    r = tl.load(res_ptr + rows[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0).to(acc_dtype)
    if HAS_X:
        r += tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(acc_dtype)
    tl.store(res_out_ptr + rows[:, None] * stride_om + cols[None, :], r, mask=mask)
    rstd = 1.0 / tl.sqrt(tl.sum(r * r, axis=1) / N + eps)  # (BLOCK_M,)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)
    w = tl.load(w_ptr + cols * stride_w, mask=col_mask, other=0.0).to(acc_dtype)
    y = r * rstd[:, None] * w[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], y, mask=mask)


@triton.jit
def _add_rmsnorm_bwd_kernel(
    res_out_ptr,
    w_ptr,
    rstd_ptr,
    dy_ptr,
    dres_out_ptr,
    dx_ptr,
    dres_ptr,
    dw_part_ptr,
    M,
    N,
    rows_per_program,
    stride_om,
    stride_w,
    stride_dym,
    stride_dom,
    stride_dxm,
    stride_drm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_DRES_OUT: tl.constexpr,
    STORE_DX: tl.constexpr,
    STORE_DRES: tl.constexpr,
):
    acc_dtype = res_out_ptr.dtype.element_ty
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w = tl.load(w_ptr + cols * stride_w, mask=col_mask, other=0.0).to(acc_dtype)
    dw = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)  # summed over rows once, at the end
    row_start = pid.to(tl.int64) * rows_per_program  # a multiple of BLOCK_M
    row_end = tl.minimum(row_start + rows_per_program, M)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        r = tl.load(res_out_ptr + rows[:, None] * stride_om + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0).to(acc_dtype)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)  # 0 for masked rows: no dw
        r_hat = r * rstd[:, None]
        dw += dy * r_hat
        dr_hat = dy * w[None, :]
        # d/dr of r * rstd(r), rstd = (mean(r^2) + eps)^-1/2
        dr = (dr_hat - r_hat * (tl.sum(dr_hat * r_hat, axis=1) / N)[:, None]) * rstd[:, None]
        if HAS_DRES_OUT:
            dr += tl.load(dres_out_ptr + rows[:, None] * stride_dom + cols[None, :], mask=mask, other=0.0).to(
                acc_dtype
            )
        if STORE_DX:
            tl.store(dx_ptr + rows[:, None] * stride_dxm + cols[None, :], dr, mask=mask)
        if STORE_DRES:
            tl.store(dres_ptr + rows[:, None] * stride_drm + cols[None, :], dr, mask=mask)
    tl.store(dw_part_ptr + pid * N + cols, tl.sum(dw, axis=0), mask=col_mask)


def _rows(t: torch.Tensor, channels: int) -> torch.Tensor:
    """(..., D) -> (M, D) with unit column stride, as the kernels index columns."""
    return (t if t.stride(-1) == 1 else t.contiguous()).reshape(-1, channels)


def _block_n(channels: int, acc_dtype: torch.dtype) -> int:
    block_n = triton.next_power_of_2(channels)
    max_channels = _MAX_FUSED_BYTES // acc_dtype.itemsize
    if block_n > max_channels:
        raise ValueError(
            f"add_rmsnorm_triton: {channels} channels exceed {max_channels} for {acc_dtype} statistics; "
            "use the reference backend"
        )
    return block_n


def _num_warps(elements: int) -> int:
    """Warps for a tile: 8 up to 8192 elements (<= 32 per thread and array), 16 above (a row of
    16384, which the backward would otherwise spill)."""
    return min(max(elements // 256, 1), 8 if elements <= 8192 else 16)


def _block_m(block_n: int, rows: int, tile: int) -> int:
    return max(1, min(tile // block_n, triton.next_power_of_2(rows)))


def _backward_rows_per_program(rows: int, block_m: int, device: torch.device) -> int:
    """Rows each backward program walks (a multiple of block_m): a few waves of programs over the
    GPU, each summing many rows of dweight."""
    # Under TRITON_INTERPRET=1 (CPU): few programs, so that tests cover several tiles per program.
    slots = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return block_m * math.ceil(rows / (slots * block_m))


def _backward_programs(rows: int, block_n: int, device: torch.device) -> tuple[int, int, int]:
    """The backward's (BLOCK_M, rows a program, programs); the programs are dweight's partial sums."""
    block_m = _block_m(block_n, rows, _BWD_TILE)
    rows_per_program = max(_backward_rows_per_program(rows, block_m, device), 1)
    n_programs = max(triton.cdiv(rows, rows_per_program), 1)  # no rows: one program writes dweight = 0
    return block_m, rows_per_program, n_programs


def _fwd(x, residual, weight, eps, out_dtype, acc_dtype):
    rows, channels = residual.shape
    block_n = _block_n(channels, acc_dtype)
    block_m = _block_m(block_n, rows, _FWD_TILE)
    y = backend.empty_output((rows, channels), residual, out_dtype)  # (M, D)
    residual_out = backend.empty_output((rows, channels), residual, acc_dtype)  # (M, D)
    rstd = backend.empty_output((rows,), residual, acc_dtype)  # (M,)
    x_ = x if x is not None else residual
    _add_rmsnorm_fwd_kernel[(triton.cdiv(rows, block_m),)](
        x_,
        residual,
        weight,
        y,
        residual_out,
        rstd,
        rows,
        channels,
        eps,
        x_.stride(0),
        residual.stride(0),
        weight.stride(0),
        y.stride(0),
        residual_out.stride(0),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HAS_X=x is not None,
        num_warps=_num_warps(block_m * block_n),
    )
    return y, residual_out, rstd


def _bwd(residual_out, weight, rstd, dy, dres_out, dx_dtype, dres_dtype):
    """dx_dtype / dres_dtype: the dtypes of the gradients to write, None for one not wanted."""
    rows, channels = residual_out.shape
    block_n = _block_n(channels, residual_out.dtype)
    dx = None
    if dx_dtype is not None:
        dx = backend.empty_output((rows, channels), residual_out, dx_dtype)  # (M, D)
    shared = dx is not None and dres_dtype == dx_dtype  # one tensor is both gradients
    dres = dx if shared else None
    if dres_dtype is not None and not shared:
        dres = backend.empty_output((rows, channels), residual_out, dres_dtype)  # (M, D)
    block_m, rows_per_program, n_programs = _backward_programs(rows, block_n, residual_out.device)
    dw_part = backend.empty_output((n_programs, channels), residual_out, residual_out.dtype)
    dres_out_ = dres_out if dres_out is not None else dy
    dx_ = dx if dx is not None else dw_part
    dres_ = dres if dres is not None else dw_part
    _add_rmsnorm_bwd_kernel[(n_programs,)](
        residual_out,
        weight,
        rstd,
        dy,
        dres_out_,
        dx_,
        dres_,
        dw_part,
        rows,
        channels,
        rows_per_program,
        residual_out.stride(0),
        weight.stride(0),
        dy.stride(0),
        dres_out_.stride(0),
        dx_.stride(0),
        dres_.stride(0),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HAS_DRES_OUT=dres_out is not None,
        STORE_DX=dx is not None,
        STORE_DRES=dres is not None and not shared,
        num_warps=_num_warps(block_m * block_n),
    )
    return dx, dres, dw_part


class _AddRMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps, out_dtype):
        channels = residual.shape[-1]
        acc_dtype = torch.promote_types(torch.float32, residual.dtype)
        if x is not None:
            acc_dtype = torch.promote_types(acc_dtype, x.dtype)
        out_dtype = out_dtype or (x.dtype if x is not None else residual.dtype)
        x2 = _rows(x, channels) if x is not None else None  # (M, D)
        y, residual_out, rstd = _fwd(x2, _rows(residual, channels), weight, eps, out_dtype, acc_dtype)
        ctx.save_for_backward(residual_out, weight, rstd)
        ctx.x_dtype = x.dtype if x is not None else None
        ctx.res_dtype = residual.dtype
        ctx.shape = residual.shape
        # Unused outputs get None, not zeros: the last norm's residual_out has no gradient.
        ctx.set_materialize_grads(False)
        return y.view(residual.shape), residual_out.view(residual.shape)

    @staticmethod
    def backward(ctx, dy, dres_out):
        residual_out, weight, rstd = ctx.saved_tensors
        need_dx = ctx.x_dtype is not None and ctx.needs_input_grad[0]
        need_dres = ctx.needs_input_grad[1]
        if dy is None:  # y unused: the gradient is dres_out's alone
            dr = dres_out if dres_out is not None else torch.zeros_like(residual_out.view(ctx.shape))
            return (
                dr.to(ctx.x_dtype) if need_dx else None,
                dr.to(ctx.res_dtype) if need_dres else None,
                torch.zeros_like(weight) if ctx.needs_input_grad[2] else None,
                None,
                None,
            )
        channels = ctx.shape[-1]
        dx, dres, dw_part = _bwd(
            residual_out,
            weight,
            rstd,
            _rows(dy, channels),
            _rows(dres_out, channels) if dres_out is not None else None,
            ctx.x_dtype if need_dx else None,
            ctx.res_dtype if need_dres else None,
        )
        return (
            dx.view(ctx.shape) if dx is not None else None,
            dres.view(ctx.shape) if dres is not None else None,
            sum_rows(dw_part).to(weight.dtype) if ctx.needs_input_grad[2] else None,
            None,
            None,
        )


def add_rmsnorm_triton(
    x: torch.Tensor | None,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-5,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `add_rmsnorm_ref`: x, residual (..., D) -> y (..., D) in out_dtype, residual_out
    (..., D) in float32 (float64 for float64 inputs).

    D must fit one program (<= 16384 channels; 8192 for float64 inputs).
    """
    channels = residual.shape[-1]
    if x is not None and x.shape != residual.shape:
        raise ValueError(f"x must have residual's shape {tuple(residual.shape)}, got {tuple(x.shape)}")
    if weight.shape != (channels,):
        raise ValueError(f"weight must be ({channels},), got {tuple(weight.shape)}")
    return _AddRMSNormFn.apply(x, residual, weight, eps, out_dtype)
