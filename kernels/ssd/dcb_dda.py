"""dCB and the scan's ddA_cumsum from one pass over dout @ x^T (experimental, off by default).

The fused core's backward needs two things from the within-chunk product G_h = (dout_h x_h^T) scaled
by dt and the decay: dCB = sum over the heads of a group of G_h, and ddA_cumsum_h, a cumulative sum
of G_h * CB along each row. mamba-ssm computes them in two kernels, `_chunk_scan_bwd_dcb` and
`_chunk_scan_bwd_ddAcs_stable`, and so does the matmul twice. Its dcb kernel can also produce
ddA_cumsum in the same pass (`HAS_DDA_CS`), with the same formula as the "stable" kernel. But its
row cumsum only runs within one column block, so that output is right only when one block spans
the chunk. mamba-ssm's backward therefore leaves that call commented out.

Here that kernel is launched directly (not through its autotuner), with BLOCK_SIZE_N = the chunk
size, so that one block spans the chunk. The outputs equal the two separate kernels' up to float32
rounding (tests/test_ssd_fused.py, path "fused-dda").

Off unless LIT_MATMAMBA_FUSED_DDA=1: on an H200 it saved no clear time (BENCHMARKS.md, fifth run).
The graphed joint step took 198.7 ms without and 199.5 ms with it at lm-130m (same GPU, one after
the other); at lm-1.4b, 424.9 ms with it against 426.9 ms without, in two processes on one GPU
(within the spread of repeated runs). Why the saved matmul does not show was not profiled. Its GPU
tests pass.
"""

from __future__ import annotations

import math
import os

import torch
import triton

from ..backend import empty_output as _empty
from ..mamba_ssm_compat import get_chunk_scan_bwd_dcb_kernel


def enabled() -> bool:
    return os.environ.get("LIT_MATMAMBA_FUSED_DDA", "0") == "1"


def chunk_scan_bwd_dcb_dda(
    x: torch.Tensor,
    dt: torch.Tensor,
    dA_cumsum: torch.Tensor,
    dout: torch.Tensor,
    CB: torch.Tensor,
    ngroups: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, dout (B, L, k, P); dt, dA_cumsum (B, k, c, Q); CB (B, c, G, Q, Q)
    -> dCB (B, c, G, Q, Q) float32, ddA_cumsum (B, k, c, Q) float32."""
    kernel = get_chunk_scan_bwd_dcb_kernel()  # mamba-ssm's, autotuned: we launch its .fn
    bsz, seqlen, nheads, headdim = x.shape
    _, _, nchunks, chunk_size = dt.shape
    block_n = max(triton.next_power_of_2(chunk_size), 16)  # one block spans the chunk
    block_m = min(32, block_n)
    m_blocks = triton.cdiv(chunk_size, block_m)
    # The heads of a group split over programs as in mamba-ssm's wrapper (`_chunk_scan_bwd_dcb`).
    sm_count = torch.cuda.get_device_properties(x.device).multi_processor_count
    per_group = nheads // ngroups
    heads_per_program = max(min(math.ceil(bsz * nchunks * nheads / sm_count), per_group), 1)
    nsplits = triton.cdiv(per_group, heads_per_program)
    dcb = _empty((bsz, nchunks, nsplits, ngroups, chunk_size, chunk_size), x, torch.float32)
    dda = _empty((bsz, nheads, nchunks, m_blocks, chunk_size), x, torch.float32)  # per row block
    grid = (m_blocks, bsz * nchunks, nsplits * ngroups)
    with torch.cuda.device(x.device.index):
        kernel.fn[grid](
            x,
            dout,
            CB,
            dt,
            dA_cumsum,
            None,  # seq_idx
            dcb,
            dda,
            chunk_size,
            headdim,
            bsz,
            seqlen,
            nheads,
            heads_per_program,
            ngroups,
            *x.stride(),
            *dout.stride(),
            *CB.stride(),
            dt.stride(0), dt.stride(2), dt.stride(1), dt.stride(3),  # (batch, chunk, head, csize)
            dA_cumsum.stride(0), dA_cumsum.stride(2), dA_cumsum.stride(1), dA_cumsum.stride(3),
            0, 0,  # seq_idx strides
            *dcb.stride(),
            dda.stride(0), dda.stride(2), dda.stride(1), dda.stride(3), dda.stride(4),
            HAS_DDA_CS=True,
            HAS_SEQ_IDX=False,
            BLOCK_SIZE_M=block_m,
            BLOCK_SIZE_N=block_n,
            BLOCK_SIZE_K=max(triton.next_power_of_2(headdim), 16),
            num_warps=4 if block_n <= 128 else 8,
            num_stages=3,
        )  # fmt: skip
    return dcb.sum(2), dda.sum(3)
