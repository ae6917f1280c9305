"""`F.linear` over a block of a larger weight, with an optional width-proportional weight gradient.

Every sub-mixer multiplies by a block of a shared weight: `in_proj.weight[rows]` and
`out_proj.weight[:, :cols]`. Plain autograd turns the gradient of such a view into a full-size
tensor (zeros, then the block copied in) and adds that into `weight.grad`: for every width and
every weight, three full-size passes over memory, however small the width. In a joint training
step of lm-1.4b that, with autocast's casts of the blocks, is about a fifth of the GPU time: the
eager joint step takes 1319 ms with autograd's weight gradients and 1055 ms with direct ones on an
H200 (docs/performance.md).

Inside `direct_weight_grads()`, `nested_linear` instead adds the block's gradient straight into
`weight.grad[rows, :cols]` during backward (allocating `weight.grad` as zeros the first time, as
autograd would). The memory traffic then scales with the width. On CUDA the GEMM itself adds into
the float32 block (beta = 1; bf16 products accumulated in float32), so there is no temporary and no
separate add; elsewhere the product is added. The price: the weight is not an
autograd input of that multiply, so autograd hooks on the parameter (DDP's and FSDP's gradient
reduction, post-accumulate-grad hooks) do not see it, and `torch.autograd.grad(loss, weight)` does
not return it. That is why it is off unless asked for; the training module turns it on for
single-process training only (`lit_matmamba.training.parallel`).

`MatMambaLM` computes its LM head (when it is a plain `nn.Linear`) through `nested_linear` too, so
the full-size head gradient is accumulated into `.grad` in place at every width. When the head is
tied to the embedding, the embedding's gradient still comes through autograd, which adds it into
the existing `.grad` in place (or, arriving first, creates the `.grad` that the head then adds to).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.nn.functional as F

_DIRECT = contextvars.ContextVar("direct_weight_grads", default=False)


@contextlib.contextmanager
def direct_weight_grads(enabled: bool = True) -> Iterator[None]:
    """Within this context (forward passes; the backward may run later), `nested_linear` adds its
    weight and bias gradients into `.grad` directly, proportional to the width (module docstring)."""
    token = _DIRECT.set(enabled)
    try:
        yield
    finally:
        _DIRECT.reset(token)


def direct_grads_apply(weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether `nested_linear(x, weight, bias, ...)` called now adds the weight (and bias) gradient
    into `.grad` itself: inside `direct_weight_grads()`, with grad mode on, for leaf tensors that
    require grad."""
    return (
        _DIRECT.get()
        and torch.is_grad_enabled()
        and weight.requires_grad
        and weight.is_leaf
        and (bias is None or (bias.requires_grad and bias.is_leaf))
    )


def nested_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: slice | tuple[slice, ...] = slice(None),
    cols: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """`F.linear(x, weight[rows, :cols], bias[rows])`. x: (..., cols) -> (..., rows).

    `rows` may be a tuple of slices: one output per block of rows, all from the same x (the mixer's
    in_proj has two blocks at every width). With direct weight gradients they are one autograd node,
    whose backward sums the blocks' input gradients in the GEMMs instead of in a separate add.
    """
    blocks = rows if isinstance(rows, tuple) else (rows,)
    if direct_grads_apply(weight, bias):
        out = _DirectGradLinear.apply(x, weight, bias, blocks, cols)
    else:
        out = tuple(F.linear(x, weight[r, :cols], None if bias is None else bias[r]) for r in blocks)
    return out if isinstance(rows, tuple) else out[0]


def _grad_block(param: torch.Tensor, index: tuple) -> torch.Tensor:
    """The view `param.grad[index]`, allocating `param.grad` as zeros the first time (as autograd would)."""
    if param.grad is None:
        param.grad = torch.zeros_like(param, memory_format=torch.contiguous_format)
    return param.grad[index]


def _accumulate_matmul(block: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """block += a @ b, a (R, T), b (T, C). On CUDA the GEMM adds into the float32 block itself
    (beta = 1, bf16/fp16 operands accumulated in float32): no (R, C) temporary, no add pass."""
    if a.is_cuda and block.dtype == a.dtype:
        block.addmm_(a, b)
    elif a.is_cuda and block.dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16):
        torch.addmm(block, a, b, out_dtype=torch.float32, out=block)
    else:
        block.add_(a @ b)


class _DirectGradLinear(torch.autograd.Function):
    """Returns no gradient for weight and bias: backward adds them into `.grad[block]` itself."""

    @staticmethod
    def forward(ctx, x, weight, bias, blocks, cols):
        ws = [weight[r, :cols] for r in blocks]  # (R_i, C) views
        bs = [None if bias is None else bias[r] for r in blocks]
        device = x.device.type
        if torch.is_autocast_enabled(device):  # cast as autocast would, once per call
            dtype = torch.get_autocast_dtype(device)
            x = x.to(dtype)
            ws = [w.to(dtype) for w in ws]
            bs = [None if b is None else b.to(dtype) for b in bs]
        ys = tuple(F.linear(x, w, b) for w, b in zip(ws, bs))  # (..., R_i)
        ctx.save_for_backward(x, *ws)
        ctx.weight, ctx.bias, ctx.blocks, ctx.cols = weight, bias, blocks, cols
        return ys

    @staticmethod
    def backward(ctx, *dys):
        x, *ws = ctx.saved_tensors  # in the compute dtype
        x2 = x.reshape(-1, x.shape[-1])  # (T, C)
        dx = None
        for r, w, dy in zip(ctx.blocks, ws, dys):
            if dy is None:  # this block's output was not used
                continue
            dy2 = dy.to(w.dtype).reshape(-1, dy.shape[-1])  # (T, R)
            if ctx.needs_input_grad[0]:  # dx = sum of dy_i @ w_i, summed by the GEMMs (beta = 1)
                dx = dy2 @ w if dx is None else dx.addmm_(dy2, w)  # (T, C)
            _accumulate_matmul(_grad_block(ctx.weight, (r, slice(None, ctx.cols))), dy2.t(), x2)  # (R, C)
            if ctx.bias is not None:
                _grad_block(ctx.bias, (r,)).add_(
                    dy2.sum(0, dtype=torch.promote_types(dy2.dtype, torch.float32))
                )
        if dx is not None:
            dx = dx.view(x.shape)
        elif ctx.needs_input_grad[0]:
            dx = torch.zeros_like(x)
        return dx, None, None, None, None
