"""The mixer's core on the GPU in one autograd node: SSD scan, then gated RMSNorm.

    xbc (B, L, 2GN + kP) = [B | C | x], the conv output
    zdt (B, L, k, P + 1) = [z | dt] per head, the in_proj output
        -> y = gated_rmsnorm(ssd(x, dt, A, B, C) + D x, z)  (B, L, kP)

Why one node instead of `ssd_scan` followed by `gated_rmsnorm`:
- Gradients land in two buffers, dxbc and dzdt, laid out like the inputs. As separate ops, autograd
  concatenates dx, dB and dC, and the z / dt views need a copy of z (to flatten the heads) in the
  forward and a copy of dz and ddt into one buffer in the backward: glue of about 20 ms per joint
  step of lm-1.4b on an H200 (docs/performance.md).
- The backward reuses what the forward computed: mamba-ssm's own backward recomputes the chunk
  cumsum, CB, the chunk states and the state passing. Here the forward keeps them, the states in
  float32 exactly as the recomputation would produce them. The forward's output is unchanged: the
  scan kernel casts the states to the input dtype either way.

The kernels are mamba-ssm's (`mamba_ssm.ops.triton.ssd_*`, state-spaces/mamba 2.2/2.3; the backward
follows `ssd_combined._mamba_chunk_scan_combined_bwd`, without an initial state, seq_idx or z) and
ours for the norm. `ssd_gated_rmsnorm` in this package falls back to the two separate ops when these
internals are not importable.
"""

from __future__ import annotations

import torch

from .. import backend
from ..gated_rmsnorm.kernel import _norm_bwd, _norm_fwd
from ..mamba_ssm_compat import get_ssd_internals
from .layout import split_xbc


class _SSDGatedRMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xbc, zdt, A, D, dt_bias, norm_weight, ngroups, chunk_size, eps, norm_before_gate):
        m = get_ssd_internals()
        bsz, seqlen, k, p1 = zdt.shape
        P, G = p1 - 1, ngroups
        x, Bm, Cm = split_xbc(xbc, G, k, P)  # (B, L, k, P), (B, L, G, N) x2: views
        N = Bm.shape[-1]
        dt, z = zdt[..., P], zdt[..., :P]  # (B, L, k), (B, L, k, P): views
        dA_cumsum, dt_proc = m.chunk_cumsum_fwd(
            dt, A, chunk_size, dt_bias=dt_bias, dt_softplus=True
        )  # (B, k, c, Q) x2
        states = m.chunk_state_fwd(Bm, x, dt_proc, dA_cumsum, states_in_fp32=True)  # (B, c, k, P, N)
        # float32 states for the backward (what its recomputation would give); without a backward
        # the input dtype, as mamba-ssm's forward stores them. The scan reads either the same way.
        keep = any(ctx.needs_input_grad)
        states, _ = m.state_passing_fwd(
            states.flatten(-2),
            dA_cumsum[:, :, :, -1],
            chunk_size=chunk_size,
            out_dtype=torch.float32 if keep else Cm.dtype,
        )
        states = states.unflatten(-1, (P, N))  # (B, c, k, P, N): the state entering each chunk
        CB = m.bmm_chunk_fwd(Cm, Bm, chunk_size, output_dtype=torch.float32)  # (B, c, G, Q, Q)
        y, _ = m.chunk_scan_fwd(CB, x, dt_proc, dA_cumsum, Cm, states, D=D)  # (B, L, k, P)
        rows = bsz * seqlen
        gate_in, gate_out = not norm_before_gate, norm_before_gate
        group_size = k * P // G
        out, rstd = _norm_fwd(
            y.view(rows, k * P), z.reshape(rows, k, P), norm_weight, eps, group_size, gate_in, gate_out
        )
        ctx.save_for_backward(xbc, zdt, A, D, dt_bias, norm_weight, dA_cumsum, dt_proc, states, CB, y, rstd)
        ctx.sizes = (G, k, P, chunk_size, group_size, gate_in, gate_out)
        return out.view(bsz, seqlen, k * P)

    @staticmethod
    def backward(ctx, dout):
        m = get_ssd_internals()
        xbc, zdt, A, D, dt_bias, norm_weight, dA_cumsum, dt_proc, states, CB, y, rstd = ctx.saved_tensors
        G, k, P, chunk_size, group_size, gate_in, gate_out = ctx.sizes
        bsz, seqlen = zdt.shape[:2]
        rows = bsz * seqlen
        x, Bm, Cm = split_xbc(xbc, G, k, P)
        N = Bm.shape[-1]
        # dB, dC and dx are written into views of dxbc, dz and ddt into views of dzdt.
        dxbc = backend.empty_output(xbc.shape, xbc, xbc.dtype)  # (B, L, 2GN + kP)
        dzdt = backend.empty_output(zdt.shape, zdt, zdt.dtype)  # (B, L, k, P + 1)
        dx, dBm, dCm = split_xbc(dxbc, G, k, P)

        # Gated norm: dy of the scan output, dz straight into dzdt.
        dy, _, dnorm_weight = _norm_bwd(
            y.view(rows, k * P),
            zdt[..., :P].reshape(rows, k, P),
            norm_weight,
            rstd,
            dout.reshape(rows, k * P),
            group_size,
            gate_in,
            gate_out,
            need_dz=True,
            dz=dzdt[..., :P].reshape(rows, k, P),
        )
        dy = dy.view(bsz, seqlen, k, P)

        # SSD: mamba-ssm's _mamba_chunk_scan_combined_bwd from "dstates = ..." on, with the
        # recomputation replaced by the tensors saved in forward.
        dstates = m.chunk_scan_bwd_dstates(Cm, dA_cumsum, dy, dtype=states.dtype)  # (B, c, k, P, N)
        dstates, ddA_chunk_cumsum, _, states_x = m.state_passing_bwd(
            states.flatten(-2),
            dA_cumsum[:, :, :, -1],
            dstates.flatten(-2),
            has_initial_states=False,
            dstates_dtype=x.dtype,
            states_dtype=x.dtype,
            chunk_size=chunk_size,
        )
        states_x, dstates = states_x.unflatten(-1, (P, N)), dstates.unflatten(-1, (P, N))
        _, ddt, dD = m.chunk_scan_chunk_state_bwd_dx(x, dt_proc, dA_cumsum, Bm, CB, dy, dstates, D=D, dx=dx)
        dB_part, ddA_next = m.chunk_state_bwd_db(x, dt_proc, dA_cumsum, dstates, B=Bm, ngroups=G)
        dC_part, ddA_cumsum_prev = m.chunk_scan_bwd_dC(states_x, dA_cumsum, dy, C=Cm, ngroups=G)
        dCB = m.chunk_scan_bwd_dcb(x, dt_proc, dA_cumsum, dy, ngroups=G).to(CB.dtype)  # (B, c, G, Q, Q)
        ddA = m.chunk_scan_bwd_ddAcs_stable(x, dt_proc, dA_cumsum, dy, CB)  # (B, k, c, Q)
        m.bmm_chunk_bwd(Cm, dCB, residual=dB_part, out=dBm)
        m.bmm_chunk_bwd(Bm, dCB.transpose(-1, -2), residual=dC_part, out=dCm)
        ddA_cumsum_prev[..., -1] += ddA_chunk_cumsum
        ddA += ddA_next + ddA_cumsum_prev.flip([-1]).cumsum(dim=-1).flip([-1])
        _, dA, ddt_bias = m.chunk_cumsum_bwd(
            ddA, ddt, zdt[..., P], A, dt_bias=dt_bias, dt_softplus=True, ddt=dzdt[..., P]
        )
        return dxbc, dzdt, dA, dD, ddt_bias, dnorm_weight, None, None, None, None


def ssd_gated_rmsnorm_triton(
    xbc: torch.Tensor,
    zdt: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor,
    dt_bias: torch.Tensor,
    norm_weight: torch.Tensor,
    ngroups: int,
    chunk_size: int,
    eps: float,
    norm_before_gate: bool,
) -> torch.Tensor:
    """See `ssd_gated_rmsnorm`. CUDA tensors only; needs mamba-ssm's Triton kernels."""
    return _SSDGatedRMSNormFn.apply(
        xbc, zdt, A, D, dt_bias, norm_weight, ngroups, chunk_size, eps, norm_before_gate
    )
