"""Triton gated RMSNorm, forward and backward; semantics of `gated_rmsnorm_ref`.

The leading dims of x and z are flattened to rows (M, d) with `reshape`: a view whenever the leading
strides merge (e.g. z = zxbcdt[..., :d], rows strided by the projection's width, costs no copy), a
copy otherwise (e.g. a z transposed in its leading dims). The kernels then read any row and column
stride. Inside, z is read as (M, heads, P) with a stride per head, so the fused mixer core
(`kernels/ssd/fused.py`) passes z = zdt[..., :P] of a (B, L, h, P+1) projection without the copy
that flattening its heads would make, and gets dz written into the matching view of its gradient.

Forward: one program per (row, group) holds the whole group in registers, statistics in float32;
the reciprocal RMS is saved (ngroups, M). Backward: a fixed number of programs per group each walk a
contiguous range of rows, recomputing x * silu(z) and writing dx and dz; dweight is summed in float32
per program and the partial sums are reduced by `partial_sums.sum_rows` (deterministic, no
atomics).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import backend
from ..partial_sums import sum_rows

# One group must fit in one program's registers; 64 KiB of input per row, like mamba-ssm's kernel.
_MAX_FUSED_BYTES = 65536


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
    BLOCK_N: tl.constexpr,
    GATE_IN: tl.constexpr,
    GATE_OUT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    ch = group * N + cols  # channels of this group
    x = tl.load(x_ptr + row * stride_xm + ch * stride_xn, mask=mask, other=0.0).to(tl.float32)
    if GATE_IN or GATE_OUT:
        z_off = row * stride_zm + (ch // z_head) * stride_zh + (ch % z_head) * stride_zn
        z = tl.load(z_ptr + z_off, mask=mask, other=0.0).to(tl.float32)
        silu_z = z * tl.sigmoid(z)
    if GATE_IN:
        x *= silu_z
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    tl.store(rstd_ptr + group * M + row, rstd)
    w = tl.load(w_ptr + ch * stride_w, mask=mask, other=0.0).to(tl.float32)
    y = x * rstd * w
    if GATE_OUT:
        y *= silu_z
    tl.store(y_ptr + row * stride_ym + ch * stride_yn, y, mask=mask)


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
    BLOCK_N: tl.constexpr,
    GATE_IN: tl.constexpr,
    GATE_OUT: tl.constexpr,
    STORE_DZ: tl.constexpr,
):
    pid = tl.program_id(0)
    group = tl.program_id(1)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    ch = group * N + cols
    head, in_head = ch // z_head, ch % z_head  # z and dz are (M, heads, z_head) views
    w = tl.load(w_ptr + ch * stride_w, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program  # int64 row offsets: M * stride may exceed 2**31
    row_end = tl.minimum(row_start + rows_per_program, M)
    for row in range(row_start, row_end):
        x = tl.load(x_ptr + row * stride_xm + ch * stride_xn, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * stride_dym + ch * stride_dyn, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + group * M + row)
        u = x  # the normalised input: x * silu(z) when gated before the norm
        if GATE_IN or GATE_OUT:
            z_off = row * stride_zm + head * stride_zh + in_head * stride_zn
            z = tl.load(z_ptr + z_off, mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(z)
            silu_z = z * sig
            dsilu_z = sig * (1.0 + z * (1.0 - sig))
        if GATE_IN:
            u = x * silu_z
        u_hat = u * rstd
        if GATE_OUT:  # y = u_hat * w * silu(z)
            dz = dy * u_hat * w * dsilu_z
            dy = dy * silu_z
        dw += dy * u_hat
        du_hat = dy * w
        # d/du of u * rstd(u), rstd = (mean(u^2) + eps)^-1/2
        du = (du_hat - u_hat * (tl.sum(du_hat * u_hat, axis=0) / N)) * rstd
        if GATE_IN:  # u = x * silu(z)
            dz = du * x * dsilu_z
            du = du * silu_z
        tl.store(dx_ptr + row * stride_dxm + ch * stride_dxn, du, mask=mask)
        if STORE_DZ:
            tl.store(dz_ptr + row * stride_dzm + head * stride_dzh + in_head * stride_dzn, dz, mask=mask)
    tl.store(dw_part_ptr + pid * (N * tl.num_programs(1)) + ch, dw, mask=mask)


def _block_and_warps(group_size: int, x: torch.Tensor) -> tuple[int, int]:
    block_n = triton.next_power_of_2(group_size)
    if block_n * x.element_size() > _MAX_FUSED_BYTES:
        raise ValueError(
            f"gated_rmsnorm_triton: group_size {group_size} exceeds {_MAX_FUSED_BYTES // x.element_size()} "
            f"channels for {x.dtype}; use more groups or the reference backend"
        )
    return block_n, min(max(block_n // 256, 1), 16)


def _backward_programs(rows: int, ngroups: int, device: torch.device) -> int:
    """Programs per group in the backward: a few waves over the GPU, each summing many rows of dweight."""
    # Under TRITON_INTERPRET=1 (CPU): few programs, so that tests cover several rows per program.
    slots = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(rows, math.ceil(slots / ngroups)))


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
    block_n, num_warps = _block_and_warps(group_size, x)
    y = backend.empty_output((rows, channels), x, x.dtype)  # (M, d)
    rstd = backend.empty_output((ngroups, rows), x, torch.float32)  # (G, M)
    z3 = _heads(z, x)  # (M, h, P)
    _norm_fwd_kernel[(rows, ngroups)](
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
        BLOCK_N=block_n,
        GATE_IN=gate_in,
        GATE_OUT=gate_out,
        num_warps=num_warps,
    )
    return y, rstd


def _norm_bwd(x, z, weight, rstd, dy, group_size, gate_in, gate_out, need_dz, dz=None):
    """Gradients of `_norm_fwd`: dx (M, d), dz in z's layout (written into `dz` when given, e.g. a view
    of a larger gradient buffer; else a new (M, d) or (M, h, P) tensor), dweight."""
    rows, channels = x.shape
    ngroups = channels // group_size
    block_n, num_warps = _block_and_warps(group_size, x)
    dx = backend.empty_output((rows, channels), x, x.dtype)  # (M, d)
    if need_dz and dz is None:
        dz = backend.empty_output(z.shape, x, z.dtype)
    n_programs = _backward_programs(rows, ngroups, x.device)
    rows_per_program = math.ceil(rows / n_programs)
    dw_part = backend.empty_output((n_programs, channels), x, torch.float32)
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
        BLOCK_N=block_n,
        GATE_IN=gate_in,
        GATE_OUT=gate_out,
        STORE_DZ=need_dz,
        num_warps=num_warps,
    )
    return dx, dz if need_dz else None, sum_rows(dw_part).to(weight.dtype)


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
