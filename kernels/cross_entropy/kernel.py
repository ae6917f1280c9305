"""Triton cross-entropy of the LM loss, forward and backward; semantics of `cross_entropy_ref`.

Why: `F.cross_entropy(logits.float(), target)` on bf16 LM logits (16384 rows x 50288 vocab in a
training step) makes an fp32 copy of the logits, runs log_softmax forward and backward in fp32 on
it, and fills and casts the gradient: about a fifth of an lm-130m joint step on an H200. Here the logits
are read in their own dtype, with float32 math in registers (float64 for float64 logits), in three
passes in all: the forward reads them once, the backward reads them once and writes the gradient.

Forward: one program per row walks the vocabulary in blocks of BLOCK_V with an online max and
sum of exponentials (rescaled when the max grows), then reads the target's logit; it writes the
row's logsumexp (N,) and loss (N,) (0 for an ignored row, NaN for a target outside [0, V): torch
raises there, which needs a host sync). The mean over the kept rows is a sum divided by their
count, both device tensors: nothing reads a value on the host, so the op can be captured in a
CUDA graph. Backward: one program per row recomputes softmax = exp(x - lse) block by block and
writes (softmax - onehot(target)) * grad_output / count in the logits' dtype (zeros for ignored
rows); grad_output and the count are read by the kernel through pointers. The logits are saved
for the backward as they are (no copy) and are not overwritten. With reduction "none" the op
returns the per-row losses (N,) and the backward scales row i by grad_output[i] (no count).

Rows and targets may have any stride (the vocabulary dim must be unit-stride, or the logits are
copied); row offsets are int64, as N * V may exceed 2**31 elements (from 42704 rows of a 50288 vocabulary; the
profiled step's 16384 rows hold 0.82e9).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .. import backend

# Elements of the vocabulary a program holds at a time, with 8 warps: 16 per thread (two 16-byte
# loads of bf16), enough loads in flight with several programs per SM; a vocabulary of 50288 takes
# 13 blocks. Not tuned on a GPU; the kernel benchmark (`lit_matmamba.bench.kernels`, op ce) times it.
_BLOCK_V = 4096
_NUM_WARPS = 8


@triton.jit
def _ce_fwd_kernel(
    logits_ptr,
    target_ptr,
    lse_ptr,
    loss_ptr,
    V,
    stride_row,
    stride_t,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    acc_dtype = lse_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)  # int64 row offsets: N * stride may exceed 2**31
    row_ptr = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([], float("-inf"), acc_dtype)  # running max of the row
    s = tl.zeros([], acc_dtype)  # running sum of exp(x - m)
    for start in range(0, V, BLOCK_V):
        c = start + cols
        x = tl.load(row_ptr + c, mask=c < V, other=float("-inf")).to(acc_dtype)  # (BLOCK_V,)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # While the row is all -inf, exp(-inf - -inf) would be NaN: shift by 0 instead (s stays 0).
        shift = tl.where(m_new == float("-inf"), 0.0, m_new).to(acc_dtype)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
        m = m_new
    lse = m + tl.log(s)
    t = tl.load(target_ptr + row * stride_t).to(tl.int64)
    keep = t != ignore_index
    in_range = (t >= 0) & (t < V)
    x_t = tl.load(row_ptr + t, mask=keep & in_range, other=0.0).to(acc_dtype)
    loss = tl.where(in_range, lse - x_t, float("nan"))
    loss = tl.where(keep, loss, 0.0)
    tl.store(lse_ptr + row, lse)
    tl.store(loss_ptr + row, loss)


@triton.jit
def _ce_bwd_kernel(
    logits_ptr,
    target_ptr,
    lse_ptr,
    dout_ptr,
    count_ptr,
    dlogits_ptr,
    V,
    stride_row,
    stride_drow,
    stride_t,
    stride_dout,
    ignore_index,
    MEAN: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    acc_dtype = lse_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    drow_ptr = dlogits_ptr + row * stride_drow
    cols = tl.arange(0, BLOCK_V)
    t = tl.load(target_ptr + row * stride_t).to(tl.int64)
    keep = t != ignore_index
    lse = tl.load(lse_ptr + row)
    if MEAN:  # d(mean loss)/d(row loss) = grad_output / count; both are 0-d device tensors.
        scale = tl.load(dout_ptr).to(acc_dtype) / tl.load(count_ptr).to(acc_dtype)
    else:  # per-row losses: grad_output (N,)
        scale = tl.load(dout_ptr + row * stride_dout).to(acc_dtype)
    for start in range(0, V, BLOCK_V):
        c = start + cols
        mask = c < V
        # An ignored row is not read: its gradient is 0 whatever its logits (inf, NaN) are.
        x = tl.load(row_ptr + c, mask=mask & keep, other=0.0).to(acc_dtype)  # (BLOCK_V,)
        g = (tl.exp(x - lse) - tl.where(c == t, 1.0, 0.0)) * scale
        g = tl.where(keep, g, 0.0)
        tl.store(drow_ptr + c, g.to(dlogits_ptr.dtype.element_ty), mask=mask)


def _launch_params(vocab: int, block_v: int | None) -> tuple[int, int]:
    """(BLOCK_V, num_warps): one block for a small vocabulary, else blocks of `block_v` (default
    _BLOCK_V; tests pass a small one to cover several blocks per row)."""
    block_v = min(block_v or _BLOCK_V, triton.next_power_of_2(vocab))
    return block_v, min(_NUM_WARPS, max(block_v // 256, 1))


def _fwd(logits, target, ignore_index, block_v):
    rows, vocab = logits.shape
    acc_dtype = torch.promote_types(torch.float32, logits.dtype)
    lse = backend.empty_output((rows,), logits, acc_dtype)  # (N,)
    losses = backend.empty_output((rows,), logits, acc_dtype)  # (N,), 0 for ignored rows
    if rows:
        block, warps = _launch_params(vocab, block_v)
        _ce_fwd_kernel[(rows,)](
            logits,
            target,
            lse,
            losses,
            vocab,
            logits.stride(0),
            target.stride(0),
            ignore_index,
            BLOCK_V=block,
            num_warps=warps,
        )
    return lse, losses


def _bwd(logits, target, lse, count, dout, ignore_index, block_v):
    """dlogits (N, V); dout () with the mean's count (), or (N,) with count None."""
    rows, vocab = logits.shape
    dlogits = backend.empty_output((rows, vocab), logits, logits.dtype)  # (N, V)
    if rows:
        block, warps = _launch_params(vocab, block_v)
        _ce_bwd_kernel[(rows,)](
            logits,
            target,
            lse,
            dout,
            count if count is not None else dout,  # unread without MEAN
            dlogits,
            vocab,
            logits.stride(0),
            dlogits.stride(0),
            target.stride(0),
            dout.stride(0) if dout.dim() else 0,
            ignore_index,
            MEAN=count is not None,
            BLOCK_V=block,
            num_warps=warps,
        )
    return dlogits


class _CrossEntropyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, ignore_index, block_v, reduction):
        if logits.stride(1) != 1:  # the kernels index the vocabulary with unit stride
            logits = logits.contiguous()
        lse, losses = _fwd(logits, target, ignore_index, block_v)
        ctx.ignore_index = ignore_index
        ctx.block_v = block_v
        if reduction == "none":
            ctx.save_for_backward(logits, target, lse)
            return losses
        count = (target != ignore_index).sum()  # () int64, on the device
        loss = losses.sum() / count  # () acc dtype; 0 / 0 = NaN when every row is ignored, as torch
        ctx.save_for_backward(logits, target, lse, count)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        logits, target, lse, *count = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        # dout: () or (N,), on the device; the kernel reads it through its pointer, the host never does.
        dlogits = _bwd(logits, target, lse, count[0] if count else None, dout, ctx.ignore_index, ctx.block_v)
        return dlogits, None, None, None, None


def cross_entropy_triton(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    block_v: int | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Triton `cross_entropy_ref`: logits (N, V), target (N,) integer -> the mean loss, a 0-d float32
    tensor (float64 for float64 logits), or with reduction "none" the per-row losses (N,). Inputs
    are checked by `cross_entropy`; `block_v` (a power of 2) overrides the vocabulary block size."""
    if block_v is not None and (block_v < 1 or block_v & (block_v - 1)):
        raise ValueError(f"block_v must be a power of 2, got {block_v}")
    return _CrossEntropyFn.apply(logits, target, int(ignore_index), block_v, reduction)
