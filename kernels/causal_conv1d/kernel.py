"""Triton causal depthwise conv1d (+ SiLU), forward and backward; semantics of `causal_conv1d_ref`.

Layout: x is channels-last (B, L, C), so every tile is (rows, BLOCK_C channels) with the channel
axis contiguous: each row of a tile is one time step of BLOCK_C channels, one coalesced segment.
Time t < 0 reads initial_state[:, :, t + K-1] (as x's dtype, like the reference).

Forward: programs tile (time blocks, channel blocks, batch); each reads K time-shifted copies of its
(BLOCK_L, BLOCK_C) tile, the overlap being served by L1/L2, not DRAM. Only the first K-1 outputs
read initial_state: program 0 recomputes them in a small tile of their own, so that the main tile
compiles without the initial_state loads.

Backward: the pre-activation is recomputed, not saved (one (B, L, C) tensor less per layer between
forward and backward). With g = dloss/dpre (dy silu'(pre)), dx[t] = sum_s weight[K-1-s] g[t+s]
needs g at K consecutive times. A program owns R runs of CH consecutive times (tile row i = the run
starting at T0 + i*CH) and walks them in lockstep, one time step u at a time: it loads x[u] and dy[u]
(one (R, BLOCK_C) tile each; 4 steps an iteration, their loads pipelined by Triton into shared
memory two iterations ahead, see `_BWD_UNROLL`), keeps the last K inputs and the last K values of g
in registers as a sliding window, and stores dx[u - (K-1)]. So x and dy are read once
(plus a halo of K-1 steps per run) and no tensor is larger than one (R, BLOCK_C) tile; the weights
are K channel vectors loaded once per program. dweight/dbias accumulate elementwise in (R, BLOCK_C)
fp32 tiles, summed over the rows once per program, then reduced in two stages: fp32 partial sums per
program, summed in PyTorch (deterministic, unlike atomics). dinitial_state (the gradient at the
times -(K-1)..-1) comes from a small tile of program 0 that recomputes g at the first steps.

Limits: K in 2..4; L * C < 2**31 (int32 offsets inside one sequence); fp32/bf16/fp16 (fp32 math).
The block sizes are fixed, chosen for coalescing (each tile row is BLOCK_C contiguous channels) and
for occupancy (ptxas register counts for sm_90: forward ~124, backward ~122, 128 with
initial_state, no spills), and compared with a few alternatives on one H200 shape; not autotuned
(docs/performance.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import backend

# The only K the mixer uses is 4; 2..4 keep `_TAPS` (a power of two >= K-1 and >= K) at 4.
_MIN_K, _MAX_K = 2, 4
_TAPS = 4
# Forward: (32, 128) tiles over 4 warps, 32 elements a thread per fp32 tile, about two tiles live
# (the accumulator and one shifted load): ~124 registers.
_FWD_BLOCK_L = 32
_FWD_MAX_BLOCK_C = 128
_FWD_WARPS = 4
# Backward: (R, BLOCK_C) = (8, 64) tiles over 4 warps, 4 channels a thread (see c2 in the kernel), so
# 4 fp32 registers a tile: the ~13 tiles live (x and g windows, dweight/dbias accumulators, the
# loads) and the 5 weight/bias channel vectors take ~120 registers, which leaves room
# for 4 programs (16 warps) an SM. 8 warps, or 8 channels a thread, double the registers a thread.
_BWD_ROWS = 8
_BWD_MAX_BLOCK_C = 64
_BWD_WARPS = 4
# Steps per run: 64. The halo of K-1 steps is 3/64 of the loads, and a program covers R * CH = 512
# steps, so the dweight/dbias partial sums (K + 1 fp32 per channel and program) stay small next to
# x. A program's R runs lie CH * C elements apart, and how well the kernel streams depends on that
# spacing (0.4 to 1.5 TB/s of x + dy + dx on an H200); summed over lm-1.4b's widths, 64 steps
# measure faster than 128 (and at lm-130m's mostly so).
_BWD_CHUNK = 64
# How the backward keeps loads in flight. It is latency-bound: each step loads only two (R, BLOCK_C)
# tiles (2 KB in bf16) a program. So it walks _BWD_UNROLL steps an iteration and lets Triton's
# software pipeliner (tl.range's num_stages = _BWD_STAGES) copy an iteration's loads into shared
# memory _BWD_STAGES - 1 iterations ahead. The pipeliner leaves a load alone while its value stays
# among the loop-carried values for more than one iteration, as in windows shifted one step an
# iteration; from 3 steps an iteration on, every window value carried to the next iteration comes
# from that iteration's own loads (Triton 3.8's sm_90 TTGIR: no async copy at 1 or 2 steps, 18 at 3,
# 24 at 4). ptxas registers for sm_90 (Triton 3.8): 122 without initial_state, 128 with, no spills,
# 16 KB of shared memory a program. On an H200 at the LM presets' shapes this measures faster than
# prefetching one step ahead into registers, in the kernel alone (by about a fifth) and in the graphed
# joint step; prefetching 0, 2 or 3 steps, 16 rows over 8 warps and unrolling without stages were
# no faster than that prefetch, and 2 or 4 stages time like 3 (docs/performance.md).
_BWD_UNROLL = 4
_BWD_STAGES = 3


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

    t and c are index tensors that broadcast against each other ((R, 1) and (1, BLOCK_C));
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
def _tap(k: tl.constexpr, v0, v1, v2, v3):
    """v_k for a compile-time k (weights, windows and dweight rows are separate variables)."""
    if k == 0:
        v = v0
    elif k == 1:
        v = v1
    elif k == 2:
        v = v2
    else:
        v = v3
    return v


@triton.jit
def _load_tap(w_ptr, c, cmask, stride_wc, stride_wk, k: tl.constexpr, K: tl.constexpr, BLOCK_C: tl.constexpr):
    """weight[c, k] as a float32 channel vector; zeros for the unused taps k >= K."""
    if k < K:
        w = tl.load(w_ptr + c * stride_wc + k * stride_wk, mask=cmask, other=0.0).to(tl.float32)
    else:
        w = tl.zeros((BLOCK_C,), dtype=tl.float32)
    return w


@triton.jit
def _load_step(row_ptr, u, stride_l, L, cmask2):
    """row_ptr[u * stride_l] for the (R, 1) times u, in the tensor's dtype; 0 for u >= L."""
    return tl.load(row_ptr + u * stride_l, mask=(u < L) & cmask2, other=0.0)


@triton.jit
def _fwd_tile(
    x_ptr,
    w_ptr,
    bias_ptr,
    init_ptr,
    y_ptr,
    b,
    t0,
    c,
    store_from,
    store_to,
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
    R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_INIT: tl.constexpr,
    ACTIVATION: tl.constexpr,
):
    """Stores y[t] for the times t in [t0, t0 + R) with store_from <= t < store_to."""
    cmask = c < C
    t = (t0 + tl.arange(0, R))[:, None]  # (R, 1)
    acc = tl.zeros((R, BLOCK_C), dtype=tl.float32)
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
        mask=(t >= store_from) & (t < store_to) & cmask[None, :],
    )


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
    # With initial_state, the outputs t < K-1 (the only ones that read it) come from a TAPS-step tile
    # of program 0; the main tile reads zeros for t < 0 and leaves them out.
    store_from = 0
    if HAS_INIT:
        store_from = K - 1
        if pid_l == 0:
            _fwd_tile(
                x_ptr,
                w_ptr,
                bias_ptr,
                init_ptr,
                y_ptr,
                b,
                0,
                c,
                0,
                tl.minimum(K - 1, L),
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
                TAPS,
                BLOCK_C,
                K,
                HAS_BIAS,
                True,
                ACTIVATION,
            )
    _fwd_tile(
        x_ptr,
        w_ptr,
        bias_ptr,
        init_ptr,
        y_ptr,
        b,
        t0,
        c,
        store_from,
        L,
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
        BLOCK_L,
        BLOCK_C,
        K,
        HAS_BIAS,
        False,
        ACTIVATION,
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
def _dinit_tile(
    x_ptr,
    init_ptr,
    dy_ptr,
    dfinal_ptr,
    dinit_ptr,
    b,
    c,
    L,
    C,
    w0,
    w1,
    w2,
    w3,
    bias,
    stride_xb,
    stride_xl,
    stride_xc,
    stride_ib,
    stride_ic,
    stride_ik,
    stride_dyb,
    stride_dyl,
    stride_dyc,
    stride_dfb,
    stride_dfc,
    stride_dfk,
    stride_dib,
    stride_dic,
    stride_dik,
    TAPS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
):
    """dinitial_state[b, c, t + K-1] = dloss/dx[t] for the times -(K-1) <= t < 0: sum_s weight[K-1-s]
    g[t+s] (g at the times 0..K-2, recomputed here, one shift at a time) + dfinal[t + K-1 - L]."""
    t = (tl.arange(0, TAPS) - TAPS)[:, None]  # (TAPS, 1): the times -TAPS..-1
    c2 = c[None, :]
    cmask2 = c2 < C
    dx = tl.zeros((TAPS, BLOCK_C), dtype=tl.float32)
    for s in tl.static_range(1, K):  # g[t + s] for s = 0 is at a time < 0, where g = 0
        ts = t + s
        g = tl.load(
            dy_ptr + b * stride_dyb + ts * stride_dyl + c2 * stride_dyc,
            mask=(ts >= 0) & (ts < L) & cmask2,
            other=0.0,
        ).to(tl.float32)
        if ACTIVATION:
            pre = tl.zeros((TAPS, BLOCK_C), dtype=tl.float32)
            if HAS_BIAS:
                pre += bias[None, :]
            for k in tl.static_range(K):
                pre += _tap(k, w0, w1, w2, w3)[None, :] * _load_padded(
                    x_ptr,
                    init_ptr,
                    b,
                    ts + (k - (K - 1)),
                    c2,
                    -1,
                    L,
                    C,
                    stride_xb,
                    stride_xl,
                    stride_xc,
                    stride_ib,
                    stride_ic,
                    stride_ik,
                    K,
                    True,
                )
            sig = tl.sigmoid(pre)
            g = g * sig * (1.0 + pre * (1.0 - sig))  # silu'(u) = s(u) (1 + u (1 - s(u)))
        dx += _tap(K - 1 - s, w0, w1, w2, w3)[None, :] * g
    j = t + (K - 1) - L  # final_state slot of time t, when L < K-1
    dx += tl.load(
        dfinal_ptr + b * stride_dfb + c2 * stride_dfc + j * stride_dfk,
        mask=(j >= 0) & (j < K - 1) & cmask2,
        other=0.0,
    ).to(tl.float32)
    p = t + (K - 1)
    tl.store(dinit_ptr + b * stride_dib + c2 * stride_dic + p * stride_dik, dx, mask=(p >= 0) & cmask2)


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
    CH,
    K: tl.constexpr,
    TAPS: tl.constexpr,
    R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_INIT: tl.constexpr,
    ACTIVATION: tl.constexpr,
    UNROLL: tl.constexpr,
    STAGES: tl.constexpr,
):
    pid_t = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    # Runs of 4 contiguous channels a thread (8-byte bf16 accesses, still whole 32-byte sectors a warp)
    # rather than the 8 of a 16-byte access: the (R, BLOCK_C) tiles then cover R = 8 rows over 4 warps
    # with 4 elements a thread. True hints (BLOCK_C >= 4, a power of two), if understated ones.
    c2 = tl.max_contiguous(tl.multiple_of(c, 4), 4)[None, :]
    cmask2 = c2 < C
    # The weights, K channel vectors, are loaded once per program.
    w0 = _load_tap(w_ptr, c, cmask, stride_wc, stride_wk, 0, K, BLOCK_C)
    w1 = _load_tap(w_ptr, c, cmask, stride_wc, stride_wk, 1, K, BLOCK_C)
    w2 = _load_tap(w_ptr, c, cmask, stride_wc, stride_wk, 2, K, BLOCK_C)
    w3 = _load_tap(w_ptr, c, cmask, stride_wc, stride_wk, 3, K, BLOCK_C)
    bias = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + c * stride_bias, mask=cmask, other=0.0).to(tl.float32)
    # Row i walks the times [start_i, start_i + CH); dx[u - (K-1)] is final at step u.
    t_first = pid_t * (R * CH)
    start = (t_first + tl.arange(0, R) * CH)[:, None]  # (R, 1)
    x_row = x_ptr + b * stride_xb + c2 * stride_xc  # (1, BLOCK_C)
    dy_row = dy_ptr + b * stride_dyb + c2 * stride_dyc
    # Windows: xw_k = x[u - (TAPS-1) + k] and gw_k = g[u - (TAPS-1) + k]; with K < TAPS the oldest ones
    # are unused. Before the first step they hold the K-1 inputs before each run (the only loads that
    # can read initial_state) and zeros (g before start_i only feeds dx before start_i, not stored here).
    xw0 = _load_padded(x_ptr, init_ptr, b, start - 3, c2, t_first - 3, L, C, stride_xb, stride_xl, stride_xc,
                       stride_ib, stride_ic, stride_ik, K, HAS_INIT)  # fmt: skip
    xw1 = _load_padded(x_ptr, init_ptr, b, start - 2, c2, t_first - 2, L, C, stride_xb, stride_xl, stride_xc,
                       stride_ib, stride_ic, stride_ik, K, HAS_INIT)  # fmt: skip
    xw2 = _load_padded(x_ptr, init_ptr, b, start - 1, c2, t_first - 1, L, C, stride_xb, stride_xl, stride_xc,
                       stride_ib, stride_ic, stride_ik, K, HAS_INIT)  # fmt: skip
    gw0 = tl.zeros((R, BLOCK_C), dtype=tl.float32)
    gw1 = tl.zeros((R, BLOCK_C), dtype=tl.float32)
    gw2 = tl.zeros((R, BLOCK_C), dtype=tl.float32)
    dw0 = tl.zeros((R, BLOCK_C), dtype=tl.float32)  # dw_k: sum over the steps of g[u] * x[u + k - (K-1)]
    dw1 = tl.zeros((R, BLOCK_C), dtype=tl.float32)
    dw2 = tl.zeros((R, BLOCK_C), dtype=tl.float32)
    dw3 = tl.zeros((R, BLOCK_C), dtype=tl.float32)
    db = tl.zeros((R, BLOCK_C), dtype=tl.float32)
    # UNROLL steps an iteration, their loads issued STAGES-1 iterations ahead by Triton's software
    # pipeliner (cp.async into shared memory; see _BWD_UNROLL for why it takes UNROLL >= 3). Loads
    # past L are masked; the last iteration's steps past the run are not stored.
    for step0 in tl.range(0, CH + K - 1, UNROLL, num_stages=STAGES):
        for j in tl.static_range(UNROLL):
            step = step0 + j
            u = start + step
            xw3 = _load_step(x_row, u, stride_xl, L, cmask2).to(tl.float32)
            g = _load_step(dy_row, u, stride_dyl, L, cmask2).to(tl.float32)  # 0 for u >= L
            if ACTIVATION:
                pre = bias[None, :] + _tap(K - 1, w0, w1, w2, w3)[None, :] * xw3
                for k in tl.static_range(K - 1):
                    pre += _tap(k, w0, w1, w2, w3)[None, :] * _tap(k + TAPS - K, xw0, xw1, xw2, xw3)
                sig = tl.sigmoid(pre)
                g = g * sig * (1.0 + pre * (1.0 - sig))  # silu'(u) = s(u) (1 + u (1 - s(u)))
            # dweight/dbias from the run's own times only (the last K-1 steps are the next run's halo).
            g_own = tl.where(step < CH, g, 0.0)
            db += g_own
            dw0 += g_own * _tap(TAPS - K, xw0, xw1, xw2, xw3)
            dw1 += g_own * _tap(TAPS - K + 1, xw0, xw1, xw2, xw3)
            if K > 2:
                dw2 += g_own * _tap(TAPS - K + 2, xw0, xw1, xw2, xw3)
            if K > 3:
                dw3 += g_own * xw3
            # dx[t], t = u - (K-1): sum_s weight[K-1-s] g[t + s], the window plus this step's g.
            dx = _tap(0, w0, w1, w2, w3)[None, :] * g
            for s in tl.static_range(K - 1):
                dx += _tap(K - 1 - s, w0, w1, w2, w3)[None, :] * _tap(s + TAPS - K, gw0, gw1, gw2, g)
            if t_first + (R - 1) * CH + step >= L:  # some row's x[t] also landed in final_state[u - L]
                jf = u - L
                dx += tl.load(
                    dfinal_ptr + b * stride_dfb + c2 * stride_dfc + jf * stride_dfk,
                    mask=(jf >= 0) & (jf < K - 1) & cmask2,
                    other=0.0,
                ).to(tl.float32)
            t = u - (K - 1)
            # Not the last iteration's steps past the run (g_own keeps them out of dweight).
            keep = (t < L) & (step >= K - 1) & (step < CH + K - 1)  # (R, 1)
            tl.store(dx_ptr + b * stride_dxb + t * stride_dxl + c2 * stride_dxc, dx, mask=keep & cmask2)
            xw0 = xw1
            xw1 = xw2
            xw2 = xw3
            gw0 = gw1
            gw1 = gw2
            gw2 = g
    # Partial sums, one row per (batch, time program): (B, n_time_programs, K, C) and (B, n_time_programs, C).
    part = b * tl.num_programs(0) + pid_t
    tl.store(db_part_ptr + part * C + c, tl.sum(db, axis=0), mask=cmask)
    dw_row = dw_part_ptr + part * K * C + c
    tl.store(dw_row, tl.sum(dw0, axis=0), mask=cmask)
    tl.store(dw_row + C, tl.sum(dw1, axis=0), mask=cmask)
    if K > 2:
        tl.store(dw_row + 2 * C, tl.sum(dw2, axis=0), mask=cmask)
    if K > 3:
        tl.store(dw_row + 3 * C, tl.sum(dw3, axis=0), mask=cmask)
    if HAS_INIT:  # noqa: SIM102 (constexpr test alone, see _load_padded)
        if pid_t == 0:
            _dinit_tile(
                x_ptr,
                init_ptr,
                dy_ptr,
                dfinal_ptr,
                dinit_ptr,
                b,
                c,
                L,
                C,
                w0,
                w1,
                w2,
                w3,
                bias,
                stride_xb,
                stride_xl,
                stride_xc,
                stride_ib,
                stride_ic,
                stride_ik,
                stride_dyb,
                stride_dyl,
                stride_dyc,
                stride_dfb,
                stride_dfc,
                stride_dfk,
                stride_dib,
                stride_dic,
                stride_dik,
                TAPS,
                BLOCK_C,
                K,
                HAS_BIAS,
                ACTIVATION,
            )


def _block_c(channels: int, max_block_c: int) -> int:
    # At least 4: the backward kernel tells the compiler its channel offsets come in aligned runs of 4.
    return min(max_block_c, max(4, triton.next_power_of_2(channels)))


def _conv_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    activation: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    bsz, seqlen, channels = x.shape
    k = weight.shape[1]
    y = backend.empty_output((bsz, seqlen, channels), x, x.dtype)  # (B, L, C)
    final_state = backend.empty_output((bsz, channels, k - 1), x, x.dtype)  # (B, C, K-1)
    # Absent tensors are replaced by x with zero strides: the HAS_* flags keep them unread.
    init = initial_state if initial_state is not None else x
    init_strides = initial_state.stride() if initial_state is not None else (0, 0, 0)
    bias_ = bias if bias is not None else weight
    block_c = _block_c(channels, _FWD_MAX_BLOCK_C)
    grid = (triton.cdiv(seqlen, _FWD_BLOCK_L), triton.cdiv(channels, block_c), bsz)
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
        BLOCK_L=_FWD_BLOCK_L,
        BLOCK_C=block_c,
        HAS_BIAS=bias is not None,
        HAS_INIT=initial_state is not None,
        ACTIVATION=activation,
        num_warps=_FWD_WARPS,
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
    dx = backend.empty_output((bsz, seqlen, channels), x, x.dtype)  # (B, L, C)
    dinit = None
    if initial_state is not None:
        dinit = backend.empty_output(initial_state.shape, x, initial_state.dtype)  # (B, C, K-1)
    # Runs of _BWD_CHUNK steps, shorter when the sequence does not fill the R rows of one program.
    chunk = max(1, min(_BWD_CHUNK, triton.cdiv(seqlen, _BWD_ROWS)))
    n_time_programs = triton.cdiv(seqlen, _BWD_ROWS * chunk)
    dw_part = backend.empty_output((bsz, n_time_programs, k, channels), x, torch.float32)
    db_part = backend.empty_output((bsz, n_time_programs, channels), x, torch.float32)
    init = initial_state if initial_state is not None else x
    init_strides = initial_state.stride() if initial_state is not None else (0, 0, 0)
    dinit_ = dinit if dinit is not None else dx
    dinit_strides = dinit.stride() if dinit is not None else (0, 0, 0)
    bias_ = bias if bias is not None else weight
    block_c = _block_c(channels, _BWD_MAX_BLOCK_C)
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
        *x.stride(),
        *weight.stride(),
        bias.stride(0) if bias is not None else 0,
        *init_strides,
        *dy.stride(),
        *dfinal.stride(),
        *dx.stride(),
        *dinit_strides,
        chunk,
        K=k,
        TAPS=_TAPS,
        R=_BWD_ROWS,
        BLOCK_C=block_c,
        HAS_BIAS=bias is not None,
        HAS_INIT=initial_state is not None,
        ACTIVATION=activation,
        UNROLL=_BWD_UNROLL,
        STAGES=_BWD_STAGES,
        num_warps=_BWD_WARPS,
    )
    dweight = dw_part.sum(dim=(0, 1)).t().to(weight.dtype)  # (C, K)
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


# One decoding step ---------------------------------------------------------------------------
# A step touches B x C channels once each, so it is a single pass over x and the state; what it
# saves over the reference's cat / multiply / sum / bias / SiLU / slice is launches (five kernels
# and a new state tensor a layer, for a decoding step that is launch-bound at small widths).
_STEP_BLOCK_C = 256
_STEP_WARPS = 4


@triton.jit
def _conv_step_kernel(
    x_ptr,
    state_ptr,
    w_ptr,
    bias_ptr,
    y_ptr,
    channels,
    stride_xb,
    stride_xc,
    stride_sb,
    stride_sc,
    stride_sk,
    stride_wc,
    stride_wk,
    stride_bias,
    stride_yb,
    stride_yc,
    K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
):
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = c < channels
    x = tl.load(x_ptr + b * stride_xb + c * stride_xc, mask=mask, other=0.0)
    w_last = tl.load(w_ptr + c * stride_wc + (K - 1) * stride_wk, mask=mask, other=0.0).to(tl.float32)
    # The state is read as x's dtype, as the reference concatenates it with x.
    acc = w_last * x.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c * stride_bias, mask=mask, other=0.0).to(tl.float32)
    state_row = state_ptr + b * stride_sb + c * stride_sc
    for k in tl.static_range(K - 1):
        s = tl.load(state_row + k * stride_sk, mask=mask, other=0.0)
        w = tl.load(w_ptr + c * stride_wc + k * stride_wk, mask=mask, other=0.0).to(tl.float32)
        acc += w * s.to(x_ptr.dtype.element_ty).to(tl.float32)
        if k > 0:  # shift the window left by one: column k moves to k-1 (already read)
            tl.store(state_row + (k - 1) * stride_sk, s, mask=mask)
    tl.store(state_row + (K - 2) * stride_sk, x.to(state_ptr.dtype.element_ty), mask=mask)
    if ACTIVATION:
        acc = acc * tl.sigmoid(acc)
    tl.store(y_ptr + b * stride_yb + c * stride_yc, acc.to(y_ptr.dtype.element_ty), mask=mask)


def causal_conv1d_step_triton(
    x: torch.Tensor,
    state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `causal_conv1d_step_ref` that updates `state` in place: x (B, C), state (B, C, K-1)
    -> y (B, C) in x's dtype, and `state` itself, now holding the last K-1 inputs (in its own
    dtype). Any strides; accumulates in float32; K in 2..4. No autograd (decoding only)."""
    bsz, channels = x.shape
    k = weight.shape[-1]
    if weight.shape != (channels, k) or not _MIN_K <= k <= _MAX_K:
        raise ValueError(
            f"weight must be (C={channels}, K) with K in {_MIN_K}..{_MAX_K}, got {tuple(weight.shape)}"
        )
    if state.shape != (bsz, channels, k - 1):
        raise ValueError(f"state must be ({bsz}, {channels}, {k - 1}), got {tuple(state.shape)}")
    if bias is not None and bias.shape != (channels,):
        raise ValueError(f"bias must be ({channels},), got {tuple(bias.shape)}")
    y = backend.empty_output((bsz, channels), x, x.dtype)  # (B, C)
    block_c = min(_STEP_BLOCK_C, triton.next_power_of_2(channels))
    grid = (bsz, triton.cdiv(channels, block_c))
    _conv_step_kernel[grid](
        x,
        state,
        weight,
        bias if bias is not None else weight,
        y,
        channels,
        *x.stride(),
        *state.stride(),
        *weight.stride(),
        bias.stride(0) if bias is not None else 0,
        *y.stride(),
        K=k,
        BLOCK_C=block_c,
        HAS_BIAS=bias is not None,
        ACTIVATION=activation,
        num_warps=_STEP_WARPS,
    )
    return y, state
