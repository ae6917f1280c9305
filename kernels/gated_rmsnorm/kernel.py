"""Triton gated RMSNorm, forward and backward; semantics of `gated_rmsnorm_ref`.

The leading dims of x and z are flattened to rows (M, d) with `reshape`: a view whenever the leading
strides merge (e.g. z = zxbcdt[..., :d], rows strided by the projection's width, costs no copy), a
copy otherwise (e.g. a z transposed in its leading dims). The kernels then read any row and column
stride. Inside, z is read as (M, heads, P) with a stride per head, so the fused mixer core
(`kernels/ssd/fused.py`) passes z = zdt[..., :P] of a (B, L, h, P+1) projection without the copy
that flattening its heads would make, and gets dz written into the matching view of its gradient.

Both kernels work on (BLOCK_M, group) tiles, a group padded to a power of 2 and BLOCK_M rows
batched so that a program keeps enough loads in flight (`kernels/tiling.py`); statistics in float32.
Forward: one program per (tile, group); the reciprocal RMS is saved (ngroups, M). Backward: a fixed
number of programs per group each walk a contiguous range of rows, recomputing x * silu(z) and
writing dx and dz; dweight is summed in float32 per program and the partial sums are reduced in
PyTorch (deterministic, no atomics). Before tiling (one row a program, or a program's loop step)
the backward streamed about half the bandwidth that add + RMSNorm's tiled backward does
(BENCHMARKS.md, sixth run).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .. import tiling
from ..backend import empty_output as _empty

# One group must fit in one program's registers; 64 KiB of input per row, like mamba-ssm's kernel.
_MAX_FUSED_BYTES = 65536
# Elements of a program's (BLOCK_M, group) tile (`kernels/tiling.py`). The forward's is add +
# RMSNorm's, chosen on an H200; the backward's is half of add + RMSNorm's, as it keeps about twice
# as many values per element (x, z, dy and their products) live in registers.
_FWD_TILE = 2048
_BWD_TILE = 4096


@triton.jit
def _norm_fwd_kernel(
    x_ptr,
    z_ptr,
    w_ptr,
    y_ptr,
    rstd_ptr,
    M,
    N,
    eps,
    stride_xm,
    stride_xn,
    stride_zm,
    stride_zh,
    stride_zn,
    z_head,
    stride_w,
    stride_ym,
    stride_yn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GATE_IN: tl.constexpr,
    GATE_OUT: tl.constexpr,
):
    # int64 row offsets: M * stride may exceed 2**31
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    group = tl.program_id(1)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    ch = group * N + cols  # channels of this group
    x = tl.load(x_ptr + rows[:, None] * stride_xm + (ch * stride_xn)[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)  # (BLOCK_M, BLOCK_N)
    if GATE_IN or GATE_OUT:
        z_col = (ch // z_head) * stride_zh + (ch % z_head) * stride_zn  # z is a (M, heads, z_head) view
        z = tl.load(z_ptr + rows[:, None] * stride_zm + z_col[None, :], mask=mask, other=0.0).to(tl.float32)
        silu_z = z * tl.sigmoid(z)
    if GATE_IN:
        x *= silu_z
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)  # (BLOCK_M,)
    tl.store(rstd_ptr + group * M + rows, rstd, mask=row_mask)
    w = tl.load(w_ptr + ch * stride_w, mask=col_mask, other=0.0).to(tl.float32)
    y = x * rstd[:, None] * w[None, :]
    if GATE_OUT:
        y *= silu_z
    tl.store(y_ptr + rows[:, None] * stride_ym + (ch * stride_yn)[None, :], y, mask=mask)


@triton.jit
def _norm_bwd_kernel(
    x_ptr,
    z_ptr,
    w_ptr,
    rstd_ptr,
    dy_ptr,
    dx_ptr,
    dz_ptr,
    dw_part_ptr,
    M,
    N,
    rows_per_program,
    stride_xm,
    stride_xn,
    stride_zm,
    stride_zh,
    stride_zn,
    z_head,
    stride_w,
    stride_dym,
    stride_dyn,
    stride_dxm,
    stride_dxn,
    stride_dzm,
    stride_dzh,
    stride_dzn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GATE_IN: tl.constexpr,
    GATE_OUT: tl.constexpr,
    STORE_DZ: tl.constexpr,
):
    pid = tl.program_id(0)
    group = tl.program_id(1)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    ch = group * N + cols
    head, in_head = ch // z_head, ch % z_head  # z and dz are (M, heads, z_head) views
    x_col, dy_col, dx_col = ch * stride_xn, ch * stride_dyn, ch * stride_dxn
    z_col, dz_col = head * stride_zh + in_head * stride_zn, head * stride_dzh + in_head * stride_dzn
    w = tl.load(w_ptr + ch * stride_w, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # summed over rows once, at the end
    row_start = pid.to(tl.int64) * rows_per_program  # a multiple of BLOCK_M
    row_end = tl.minimum(row_start + rows_per_program, M)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + x_col[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + dy_col[None, :], mask=mask, other=0.0)
        dy = dy.to(tl.float32)  # (BLOCK_M, BLOCK_N)
        rstd = tl.load(rstd_ptr + group * M + rows, mask=row_mask, other=0.0)  # 0 for masked rows: no dw
        u = x  # the normalised input: x * silu(z) when gated before the norm
        if GATE_IN or GATE_OUT:
            z = tl.load(z_ptr + rows[:, None] * stride_zm + z_col[None, :], mask=mask, other=0.0)
            z = z.to(tl.float32)
            sig = tl.sigmoid(z)
            silu_z = z * sig
            dsilu_z = sig * (1.0 + z * (1.0 - sig))
        if GATE_IN:
            u = x * silu_z
        u_hat = u * rstd[:, None]
        if GATE_OUT:  # y = u_hat * w * silu(z)
            dz = dy * u_hat * w[None, :] * dsilu_z
            dy = dy * silu_z
        dw += dy * u_hat
        du_hat = dy * w[None, :]
        # d/du of u * rstd(u), rstd = (mean(u^2) + eps)^-1/2
        du = (du_hat - u_hat * (tl.sum(du_hat * u_hat, axis=1) / N)[:, None]) * rstd[:, None]
        if GATE_IN:  # u = x * silu(z)
            dz = du * x * dsilu_z
            du = du * silu_z
        tl.store(dx_ptr + rows[:, None] * stride_dxm + dx_col[None, :], du, mask=mask)
        if STORE_DZ:
            tl.store(dz_ptr + rows[:, None] * stride_dzm + dz_col[None, :], dz, mask=mask)
    tl.store(dw_part_ptr + pid * (N * tl.num_programs(1)) + ch, tl.sum(dw, axis=0), mask=col_mask)


def _block_n(group_size: int, x: torch.Tensor) -> int:
    block_n = triton.next_power_of_2(group_size)
    if block_n * x.element_size() > _MAX_FUSED_BYTES:
        raise ValueError(
            f"gated_rmsnorm_triton: group_size {group_size} exceeds {_MAX_FUSED_BYTES // x.element_size()} "
            f"channels for {x.dtype}; use more groups or the reference backend"
        )
    return block_n


def _tiles() -> tuple[int, int]:
    """(forward, backward) elements of a tile; LIT_MATMAMBA_NORM_TILES="fwd,bwd" overrides them
    (benchmarks time settings through it, e.g. "1,1": one row a tile, the kernels before tiling)."""
    spec = os.environ.get("LIT_MATMAMBA_NORM_TILES")
    if spec is None:
        return _FWD_TILE, _BWD_TILE
    try:
        fwd, bwd = (int(v) for v in spec.split(","))
    except ValueError:
        raise ValueError(f'LIT_MATMAMBA_NORM_TILES={spec!r}: expected two integers, "fwd,bwd"') from None
    return fwd, bwd


def _heads(z: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """z as (M, heads, P): a (M, d) z is one head of d channels. The kernels read any of the three strides."""
    if z is None:
        return x.unsqueeze(1)  # unused by the kernels; any valid pointer
    return z.unsqueeze(1) if z.dim() == 2 else z


def _norm_fwd(x, z, weight, eps, group_size, gate_in, gate_out):
    """x (M, d); z None, (M, d) or (M, heads, P) with heads * P = d (e.g. a strided view of a
    projection holding z and dt per head). Returns y (M, d) and rstd (G, M)."""
    rows, channels = x.shape
    ngroups = channels // group_size
    block_n = _block_n(group_size, x)
    block_m = tiling.block_m(block_n, rows, _tiles()[0])
    y = _empty((rows, channels), x, x.dtype)  # (M, d)
    rstd = _empty((ngroups, rows), x, torch.float32)  # (G, M)
    z3 = _heads(z, x)  # (M, h, P)
    _norm_fwd_kernel[(triton.cdiv(rows, block_m), ngroups)](
        x,
        z3,
        weight,
        y,
        rstd,
        rows,
        group_size,
        eps,
        *x.stride(),
        *z3.stride(),
        z3.shape[-1],
        weight.stride(0),
        *y.stride(),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        GATE_IN=gate_in,
        GATE_OUT=gate_out,
        num_warps=tiling.num_warps(block_m * block_n),
    )
    return y, rstd


def _norm_bwd(x, z, weight, rstd, dy, group_size, gate_in, gate_out, need_dz, dz=None):
    """Gradients of `_norm_fwd`: dx (M, d), dz in z's layout (written into `dz` when given, e.g. a view
    of a larger gradient buffer; else a new (M, d) or (M, h, P) tensor), dweight."""
    rows, channels = x.shape
    ngroups = channels // group_size
    block_n = _block_n(group_size, x)
    block_m = tiling.block_m(block_n, rows, _tiles()[1])
    dx = _empty((rows, channels), x, x.dtype)  # (M, d)
    if need_dz and dz is None:
        dz = _empty(z.shape, x, z.dtype)
    rows_per_program = tiling.backward_rows_per_program(rows, block_m, x.device, programs_per_row=ngroups)
    n_programs = max(triton.cdiv(rows, rows_per_program), 1)  # no rows: one program writes dweight = 0
    dw_part = _empty((n_programs, channels), x, torch.float32)
    z3 = _heads(z, x)  # (M, h, P)
    dz3 = _heads(dz, x) if need_dz else z3
    _norm_bwd_kernel[(n_programs, ngroups)](
        x,
        z3,
        weight,
        rstd,
        dy,
        dx,
        dz3,
        dw_part,
        rows,
        group_size,
        rows_per_program,
        *x.stride(),
        *z3.stride(),
        z3.shape[-1],
        weight.stride(0),
        *dy.stride(),
        *dx.stride(),
        *dz3.stride(),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        GATE_IN=gate_in,
        GATE_OUT=gate_out,
        STORE_DZ=need_dz,
        num_warps=tiling.num_warps(block_m * block_n),
    )
    return dx, dz if need_dz else None, dw_part.sum(0).to(weight.dtype)


class _GatedRMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, z, weight, eps, group_size, norm_before_gate):
        channels = x.shape[-1]
        x2 = x.reshape(-1, channels)  # (M, d)
        z2 = z.reshape(-1, channels) if z is not None else None  # (M, d), a view when z's rows merge
        gate_in = z is not None and not norm_before_gate
        gate_out = z is not None and norm_before_gate
        y, rstd = _norm_fwd(x2, z2, weight, eps, group_size, gate_in, gate_out)
        ctx.save_for_backward(x2, z2, weight, rstd)
        ctx.group_size, ctx.gate_in, ctx.gate_out = group_size, gate_in, gate_out
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, z2, weight, rstd = ctx.saved_tensors
        need_dz = z2 is not None and ctx.needs_input_grad[1]
        dy2 = dy.reshape(x2.shape)  # (M, d)
        dx, dz, dweight = _norm_bwd(
            x2, z2, weight, rstd, dy2, ctx.group_size, ctx.gate_in, ctx.gate_out, need_dz
        )
        return (
            dx.view(ctx.x_shape),
            dz.view(ctx.x_shape) if dz is not None else None,
            dweight if ctx.needs_input_grad[2] else None,
            None,
            None,
            None,
        )


def gated_rmsnorm_triton(
    x: torch.Tensor,
    z: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float = 1e-5,
    group_size: int | None = None,
    norm_before_gate: bool = False,
) -> torch.Tensor:
    """Triton `gated_rmsnorm_ref`: x, z (..., d) -> (..., d) in x's dtype; float32 statistics.

    Reads any strides of x, z, weight (a prefix view is fine); group_size must divide d and fit one
    program (<= 16384 channels in float32, 32768 in bf16/fp16).
    """
    channels = x.shape[-1]
    group_size = group_size or channels
    if channels % group_size:
        raise ValueError(f"group_size {group_size} does not divide {channels}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"z must have x's shape {tuple(x.shape)}, got {tuple(z.shape)}")
    if weight.shape != (channels,):
        raise ValueError(f"weight must be ({channels},), got {tuple(weight.shape)}")
    return _GatedRMSNormFn.apply(x, z, weight, eps, group_size, norm_before_gate)
