"""Triton causal depthwise conv1d (+ SiLU), forward and backward; semantics of `causal_conv1d_ref`.

Layout: x is channels-last (B, L, C), so every tile is (BLOCK_L time steps, BLOCK_C channels) with
the channel axis contiguous (coalesced loads). Forward programs tile (time blocks, channel blocks,
batch); each reads K time-shifted copies of its tile, the overlap being served by L1/L2, not DRAM.
Time t < 0 reads initial_state[:, :, t + K-1] (as x's dtype, like the reference).

Backward: programs tile (groups of time blocks, channel blocks, batch) and walk their time blocks.
The pre-activation is recomputed, not saved (one (B, L, C) tensor less per layer between forward and
backward). dx[t] needs g = dloss/dpre at t..t+K-1: the K shifts of g are one (TAPS, BLOCK_L, BLOCK_C)
tensor built from K shifted 3-D loads, which keeps the weights as K channel vectors in registers
(per-shift weight tiles, hoisted out of the loop, cost ~200 registers). dweight/dbias are reduced in
two stages, fp32 partial sums per program then a sum in PyTorch: deterministic, unlike atomics.

Limits: K in 2..4; L * C < 2**31 (int32 offsets inside one sequence); fp32/bf16/fp16 (fp32 math).
The block sizes are fixed, chosen from ptxas register counts for sm_90 (fwd ~90, bwd ~190 registers,
no spills without initial_state), not tuned by timing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import empty_output as _empty

# The only K the mixer uses is 4; 2..4 keep `_TAPS` (a power of two >= K-1 and >= K) at 4.
_MIN_K, _MAX_K = 2, 4
_TAPS = 4
_BLOCK_L = 16
_MAX_BLOCK_C = 64
# Backward programs walk up to this many time blocks each, so that the dweight/dbias partial sums
# (one row per program) stay small next to x.
_BWD_BLOCKS_PER_PROGRAM = 8


@triton.jit
def _load_padded(
    x_ptr,
    init_ptr,
    b,
    t,
    c,
    t_min,
    L,
    C,
    stride_xb,
    stride_xl,
    stride_xc,
    stride_ib,
    stride_ic,
    stride_ik,
    K: tl.constexpr,
    HAS_INIT: tl.constexpr,
):
    """x[b, t, c] as float32, where -(K-1) <= t < 0 reads initial_state[b, c, t + K-1], and 0 elsewhere.

    t and c are index tensors that broadcast against each other ((R, 1) and (1, BLOCK_C), or 3-D);
    t_min (a scalar <= min(t)) skips the initial_state load for the tiles that cannot touch it.
    """
    cmask = c < C
    val = tl.load(
        x_ptr + b * stride_xb + t * stride_xl + c * stride_xc,
        mask=(t >= 0) & (t < L) & cmask,
        other=0.0,
    ).to(tl.float32)
    # Nested, not `and`: the constexpr test must stay alone so that Triton drops the load at compile time.
    if HAS_INIT:  # noqa: SIM102
        if t_min < 0:
            p = t + (K - 1)
            init = tl.load(
                init_ptr + b * stride_ib + c * stride_ic + p * stride_ik,
                mask=(p >= 0) & (t < 0) & cmask,
                other=0.0,
            )
            val += init.to(x_ptr.dtype.element_ty).to(tl.float32)
    return val


@triton.jit
def _grad_input_tile(
    x_ptr,
    init_ptr,
    w_ptr,
    bias_ptr,
    dy_ptr,
    dfinal_ptr,
    b,
    t0,
    c,
    L,
    C,
    stride_xb,
    stride_xl,
    stride_xc,
    stride_ib,
    stride_ic,
    stride_ik,
    stride_wc,
    stride_wk,
    stride_bias,
    stride_dyb,
    stride_dyl,
    stride_dyc,
    stride_dfb,
    stride_dfc,
    stride_dfk,
    R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    K: tl.constexpr,
    TAPS: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
):
    """Gradients at the x times t in [t0, t0 + R); t < 0 stands for initial_state slot t + K-1.

    Returns d loss / d x[t] (from y and from final_state) and g[t] = d loss / d pre-activation[t],
    float32 (R, BLOCK_C). With g3[s, i] = g[t0 + s + i], d x[t0 + i] = sum_s weight[K-1-s] g3[s, i]
    + dfinal[t0 + i + K-1 - L]. The K shifts are one (TAPS, R, BLOCK_C) tensor, so that the weights
    stay K channel vectors in registers.
    """
    s = tl.arange(0, TAPS)  # shift
    i = tl.arange(0, R)
    cmask = c < C
    c3 = c[None, None, :]
    tg = (t0 + s[:, None] + i[None, :])[:, :, None]  # (TAPS, R, 1) time of g3[s, i]
    g3 = tl.load(
        dy_ptr + b * stride_dyb + tg * stride_dyl + c3 * stride_dyc,
        mask=(s < K)[:, None, None] & (tg >= 0) & (tg < L) & (c3 < C),
        other=0.0,
    ).to(tl.float32)  # (TAPS, R, BLOCK_C)
    if ACTIVATION:
        pre3 = tl.zeros((TAPS, R, BLOCK_C), dtype=tl.float32)
        if HAS_BIAS:
            pre3 += tl.load(bias_ptr + c * stride_bias, mask=cmask, other=0.0).to(tl.float32)[None, None, :]
        for k in tl.static_range(K):
            w_k = tl.load(w_ptr + c * stride_wc + k * stride_wk, mask=cmask, other=0.0).to(tl.float32)
            x_k = _load_padded(
                x_ptr,
                init_ptr,
                b,
                tg + (k - (K - 1)),
                c3,
                t0 + k - (K - 1),
                L,
                C,
                stride_xb,
                stride_xl,
                stride_xc,
                stride_ib,
                stride_ic,
                stride_ik,
                K,
                HAS_INIT,
            )  # (TAPS, R, BLOCK_C)
            pre3 += w_k[None, None, :] * x_k
        sig = tl.sigmoid(pre3)
        g3 = g3 * sig * (1.0 + pre3 * (1.0 - sig))  # silu'(u) = s(u) (1 + u (1 - s(u)))
    w_dx = tl.load(
        w_ptr + c[None, :] * stride_wc + (K - 1 - s)[:, None] * stride_wk,
        mask=(s < K)[:, None] & cmask[None, :],
        other=0.0,
    ).to(tl.float32)  # (TAPS, BLOCK_C): w_dx[s] = weight[K-1-s]
    dx = tl.sum(w_dx[:, None, :] * g3, axis=0)
    j = (t0 + i + (K - 1) - L)[:, None]  # the final_state slot x[t] landed in, if any
    dx += tl.load(
        dfinal_ptr + b * stride_dfb + c[None, :] * stride_dfc + j * stride_dfk,
        mask=(j >= 0) & (j < K - 1) & cmask[None, :],
        other=0.0,
    ).to(tl.float32)
    g = tl.sum(tl.where((s == 0)[:, None, None], g3, 0.0), axis=0)
    return dx, g


@triton.jit
def _conv_fwd_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    init_ptr,
    y_ptr,
    final_ptr,
    L,
    C,
    stride_xb,
    stride_xl,
    stride_xc,
    stride_wc,
    stride_wk,
    stride_bias,
    stride_ib,
    stride_ic,
    stride_ik,
    stride_yb,
    stride_yl,
    stride_yc,
    stride_fb,
    stride_fc,
    stride_fk,
    K: tl.constexpr,
    TAPS: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_INIT: tl.constexpr,
    ACTIVATION: tl.constexpr,
):
    pid_l = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    t0 = pid_l * BLOCK_L
    t = (t0 + tl.arange(0, BLOCK_L))[:, None]  # (BLOCK_L, 1)
    acc = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c * stride_bias, mask=cmask, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(K):  # y[t] = bias + sum_k weight[k] x[t + k - (K-1)]
        w_k = tl.load(w_ptr + c * stride_wc + k * stride_wk, mask=cmask, other=0.0).to(tl.float32)
        x_k = _load_padded(
            x_ptr,
            init_ptr,
            b,
            t + (k - (K - 1)),
            c[None, :],
            t0 + k - (K - 1),
            L,
            C,
            stride_xb,
            stride_xl,
            stride_xc,
            stride_ib,
            stride_ic,
            stride_ik,
            K,
            HAS_INIT,
        )
        acc += w_k[None, :] * x_k
    if ACTIVATION:
        acc = acc * tl.sigmoid(acc)
    tl.store(
        y_ptr + b * stride_yb + t * stride_yl + c[None, :] * stride_yc,
        acc,
        mask=(t < L) & cmask[None, :],
    )
    if pid_l == tl.num_programs(0) - 1:
        # final_state[b, c, j] = x[L - (K-1) + j]: the last K-1 inputs (reaching into initial_state if L < K-1).
        j = tl.arange(0, TAPS)[:, None]  # (TAPS, 1)
        last = _load_padded(
            x_ptr,
            init_ptr,
            b,
            j + (L - (K - 1)),
            c[None, :],
            L - (K - 1),
            L,
            C,
            stride_xb,
            stride_xl,
            stride_xc,
            stride_ib,
            stride_ic,
            stride_ik,
            K,
            HAS_INIT,
        )
        tl.store(
            final_ptr + b * stride_fb + c[None, :] * stride_fc + j * stride_fk,
            last,
            mask=(j < K - 1) & cmask[None, :],
        )


@triton.jit
def _bwd_tile(
    x_ptr,
    init_ptr,
    w_ptr,
    bias_ptr,
    dy_ptr,
    dfinal_ptr,
    dx_ptr,
    b,
    t0,
    c,
    L,
    C,
    dw_acc,
    db_acc,
    stride_xb,
    stride_xl,
    stride_xc,
    stride_ib,
    stride_ic,
    stride_ik,
    stride_wc,
    stride_wk,
    stride_bias,
    stride_dyb,
    stride_dyl,
    stride_dyc,
    stride_dfb,
    stride_dfc,
    stride_dfk,
    stride_dxb,
    stride_dxl,
    stride_dxc,
    R: tl.constexpr,
    K: tl.constexpr,
    TAPS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
):
    """Stores dx for the times [t0, t0 + R) and adds their share to dweight and dbias."""
    t = (t0 + tl.arange(0, R))[:, None]  # (R, 1)
    taps = tl.arange(0, TAPS)
    dx, g = _grad_input_tile(
        x_ptr,
        init_ptr,
        w_ptr,
        bias_ptr,
        dy_ptr,
        dfinal_ptr,
        b,
        t0,
        c,
        L,
        C,
        stride_xb,
        stride_xl,
        stride_xc,
        stride_ib,
        stride_ic,
        stride_ik,
        stride_wc,
        stride_wk,
        stride_bias,
        stride_dyb,
        stride_dyl,
        stride_dyc,
        stride_dfb,
        stride_dfc,
        stride_dfk,
        R,
        BLOCK_C,
        K,
        TAPS,
        HAS_INIT,
        HAS_BIAS,
        ACTIVATION,
    )
    db_acc += tl.sum(g, axis=0)
    for k in tl.static_range(K):
        x_k = _load_padded(
            x_ptr,
            init_ptr,
            b,
            t + (k - (K - 1)),
            c[None, :],
            t0 + k - (K - 1),
            L,
            C,
            stride_xb,
            stride_xl,
            stride_xc,
            stride_ib,
            stride_ic,
            stride_ik,
            K,
            HAS_INIT,
        )
        dw_acc += tl.where(taps[:, None] == k, tl.sum(g * x_k, axis=0)[None, :], 0.0)
    tl.store(
        dx_ptr + b * stride_dxb + t * stride_dxl + c[None, :] * stride_dxc,
        dx,
        mask=(t < L) & (c < C)[None, :],
    )
    return dw_acc, db_acc


@triton.jit
def _conv_bwd_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    init_ptr,
    dy_ptr,
    dfinal_ptr,
    dx_ptr,
    dinit_ptr,
    dw_part_ptr,
    db_part_ptr,
    L,
    C,
    blocks_per_program,
    stride_xb,
    stride_xl,
    stride_xc,
    stride_wc,
    stride_wk,
    stride_bias,
    stride_ib,
    stride_ic,
    stride_ik,
    stride_dyb,
    stride_dyl,
    stride_dyc,
    stride_dfb,
    stride_dfc,
    stride_dfk,
    stride_dxb,
    stride_dxl,
    stride_dxc,
    stride_dib,
    stride_dic,
    stride_dik,
    K: tl.constexpr,
    TAPS: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_INIT: tl.constexpr,
    ACTIVATION: tl.constexpr,
):
    pid_t = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    taps = tl.arange(0, TAPS)
    dw_acc = tl.zeros((TAPS, BLOCK_C), dtype=tl.float32)  # row k: sum_t g[t] * x[t + k - (K-1)]
    db_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    # With initial_state, the first TAPS (>= K-1) steps, the only ones that read it, are a small tile of
    # their own and the BLOCK_L tiles start after them: the tile loop then compiles without the
    # initial_state loads, which would push it past 255 registers.
    t_start = 0
    if HAS_INIT:
        t_start = TAPS
        if pid_t == 0:
            dw_acc, db_acc = _bwd_tile(
                x_ptr,
                init_ptr,
                w_ptr,
                bias_ptr,
                dy_ptr,
                dfinal_ptr,
                dx_ptr,
                b,
                0,
                c,
                L,
                C,
                dw_acc,
                db_acc,
                stride_xb,
                stride_xl,
                stride_xc,
                stride_ib,
                stride_ic,
                stride_ik,
                stride_wc,
                stride_wk,
                stride_bias,
                stride_dyb,
                stride_dyl,
                stride_dyc,
                stride_dfb,
                stride_dfc,
                stride_dfk,
                stride_dxb,
                stride_dxl,
                stride_dxc,
                TAPS,
                K,
                TAPS,
                BLOCK_C,
                True,
                HAS_BIAS,
                ACTIVATION,
            )
    for blk in range(blocks_per_program):
        dw_acc, db_acc = _bwd_tile(
            x_ptr,
            init_ptr,
            w_ptr,
            bias_ptr,
            dy_ptr,
            dfinal_ptr,
            dx_ptr,
            b,
            t_start + (pid_t * blocks_per_program + blk) * BLOCK_L,
            c,
            L,
            C,
            dw_acc,
            db_acc,
            stride_xb,
            stride_xl,
            stride_xc,
            stride_ib,
            stride_ic,
            stride_ik,
            stride_wc,
            stride_wk,
            stride_bias,
            stride_dyb,
            stride_dyl,
            stride_dyc,
            stride_dfb,
            stride_dfc,
            stride_dfk,
            stride_dxb,
            stride_dxl,
            stride_dxc,
            BLOCK_L,
            K,
            TAPS,
            BLOCK_C,
            False,
            HAS_BIAS,
            ACTIVATION,
        )
    # Partial sums, one row per (batch, time program): (B, n_time_programs, TAPS, C) and (B, n_time_programs, C).
    part = b * tl.num_programs(0) + pid_t
    tl.store(dw_part_ptr + (part * TAPS + taps[:, None]) * C + c[None, :], dw_acc, mask=cmask[None, :])
    tl.store(db_part_ptr + part * C + c, db_acc, mask=cmask)
    if HAS_INIT:  # noqa: SIM102 (constexpr test alone, see _load_padded)
        if pid_t == 0:  # initial_state slot j holds x time j - (K-1)
            dinit, _ = _grad_input_tile(
                x_ptr,
                init_ptr,
                w_ptr,
                bias_ptr,
                dy_ptr,
                dfinal_ptr,
                b,
                1 - K,
                c,
                L,
                C,
                stride_xb,
                stride_xl,
                stride_xc,
                stride_ib,
                stride_ic,
                stride_ik,
                stride_wc,
                stride_wk,
                stride_bias,
                stride_dyb,
                stride_dyl,
                stride_dyc,
                stride_dfb,
                stride_dfc,
                stride_dfk,
                TAPS,
                BLOCK_C,
                K,
                TAPS,
                HAS_INIT,
                HAS_BIAS,
                ACTIVATION,
            )
            tl.store(
                dinit_ptr + b * stride_dib + c[None, :] * stride_dic + taps[:, None] * stride_dik,
                dinit,
                mask=(taps < K - 1)[:, None] & cmask[None, :],
            )


def _block_c(channels: int) -> int:
    return min(_MAX_BLOCK_C, triton.next_power_of_2(channels))


def _conv_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    activation: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    bsz, seqlen, channels = x.shape
    k = weight.shape[1]
    y = _empty((bsz, seqlen, channels), x, x.dtype)  # (B, L, C)
    final_state = _empty((bsz, channels, k - 1), x, x.dtype)  # (B, C, K-1)
    # Absent tensors are replaced by x with zero strides: the HAS_* flags keep them unread.
    init = initial_state if initial_state is not None else x
    init_strides = initial_state.stride() if initial_state is not None else (0, 0, 0)
    bias_ = bias if bias is not None else weight
    block_c = _block_c(channels)
    grid = (triton.cdiv(seqlen, _BLOCK_L), triton.cdiv(channels, block_c), bsz)
    _conv_fwd_kernel[grid](
        x,
        weight,
        bias_,
        init,
        y,
        final_state,
        seqlen,
        channels,
        *x.stride(),
        *weight.stride(),
        bias.stride(0) if bias is not None else 0,
        *init_strides,
        *y.stride(),
        *final_state.stride(),
        K=k,
        TAPS=_TAPS,
        BLOCK_L=_BLOCK_L,
        BLOCK_C=block_c,
        HAS_BIAS=bias is not None,
        HAS_INIT=initial_state is not None,
        ACTIVATION=activation,
        num_warps=4,
    )
    return y, final_state


def _conv_bwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    activation: bool,
    dy: torch.Tensor,
    dfinal: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    bsz, seqlen, channels = x.shape
    k = weight.shape[1]
    dx = _empty((bsz, seqlen, channels), x, x.dtype)  # (B, L, C)
    dinit = (
        _empty(initial_state.shape, x, initial_state.dtype) if initial_state is not None else None
    )  # (B, C, K-1)
    # Tiles of BLOCK_L steps after the first _TAPS steps, which have a tile of their own when initial_state is given.
    n_blocks = max(1, triton.cdiv(seqlen - (_TAPS if initial_state is not None else 0), _BLOCK_L))
    blocks_per_program = min(n_blocks, _BWD_BLOCKS_PER_PROGRAM)
    n_time_programs = triton.cdiv(n_blocks, blocks_per_program)
    dw_part = _empty((bsz, n_time_programs, _TAPS, channels), x, torch.float32)
    db_part = _empty((bsz, n_time_programs, channels), x, torch.float32)
    init = initial_state if initial_state is not None else x
    init_strides = initial_state.stride() if initial_state is not None else (0, 0, 0)
    dinit_ = dinit if dinit is not None else dx
    dinit_strides = dinit.stride() if dinit is not None else (0, 0, 0)
    bias_ = bias if bias is not None else weight
    block_c = _block_c(channels)
    grid = (n_time_programs, triton.cdiv(channels, block_c), bsz)
    _conv_bwd_kernel[grid](
        x,
        weight,
        bias_,
        init,
        dy,
        dfinal,
        dx,
        dinit_,
        dw_part,
        db_part,
        seqlen,
        channels,
        blocks_per_program,
        *x.stride(),
        *weight.stride(),
        bias.stride(0) if bias is not None else 0,
        *init_strides,
        *dy.stride(),
        *dfinal.stride(),
        *dx.stride(),
        *dinit_strides,
        K=k,
        TAPS=_TAPS,
        BLOCK_L=_BLOCK_L,
        BLOCK_C=block_c,
        HAS_BIAS=bias is not None,
        HAS_INIT=initial_state is not None,
        ACTIVATION=activation,
        num_warps=4,
    )
    dweight = dw_part[:, :, :k].sum(dim=(0, 1)).t().to(weight.dtype)  # (C, K)
    dbias = db_part.sum(dim=(0, 1)).to(bias.dtype) if bias is not None else None  # (C,)
    return dx, dweight, dbias, dinit


class _CausalConv1dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, initial_state, activation):
        y, final_state = _conv_fwd(x, weight, bias, initial_state, activation)
        ctx.save_for_backward(x, weight, bias, initial_state)
        ctx.activation = activation
        return y, final_state

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, weight, bias, initial_state = ctx.saved_tensors
        dx, dweight, dbias, dinit = _conv_bwd(x, weight, bias, initial_state, ctx.activation, dy, dfinal)
        needs = ctx.needs_input_grad
        return (
            dx if needs[0] else None,
            dweight if needs[1] else None,
            dbias if needs[2] else None,
            dinit if needs[3] else None,
            None,
        )


def causal_conv1d_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    activation: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `causal_conv1d_ref`: x (B, L, C) -> y (B, L, C), final_state (B, C, K-1), both in x's dtype.

    Any strides are read as they are (weight and bias may be prefix views of larger parameters;
    their gradients have the views' shapes). Accumulates in float32; K in 2..4.
    """
    bsz, _, channels = x.shape
    k = weight.shape[-1]
    if weight.shape != (channels, k) or not _MIN_K <= k <= _MAX_K:
        raise ValueError(
            f"weight must be (C={channels}, K) with K in {_MIN_K}..{_MAX_K}, got {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != (channels,):
        raise ValueError(f"bias must be ({channels},), got {tuple(bias.shape)}")
    if initial_state is not None and initial_state.shape != (bsz, channels, k - 1):
        raise ValueError(
            f"initial_state must be ({bsz}, {channels}, {k - 1}), got {tuple(initial_state.shape)}"
        )
    return _CausalConv1dFn.apply(x, weight, bias, initial_state, activation)
