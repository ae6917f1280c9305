"""`F.linear` over a block of a larger weight, with an optional width-proportional weight gradient.

Every sub-mixer multiplies by a block of a shared weight: `in_proj.weight[rows]` and
`out_proj.weight[:, :cols]`. Plain autograd turns the gradient of such a view into a full-size
tensor (zeros, then the block copied in) and adds that into `weight.grad`: for every width and
every weight, three full-size passes over memory, however small the width. In a joint training
step of lm-1.4b this, with autocast's casts of the blocks, was about a fifth of the GPU time
(BENCHMARKS.md).

Inside `direct_weight_grads()`, `nested_linear` instead adds the block's gradient straight into
`weight.grad[rows, :cols]` during backward (allocating `weight.grad` as zeros the first time, as
autograd would). The memory traffic then scales with the width. The price: the weight is not an
autograd input of that multiply, so autograd hooks on the parameter (DDP's and FSDP's gradient
reduction, post-accumulate-grad hooks) do not see it, and `torch.autograd.grad(loss, weight)` does
not return it. That is why it is off unless asked for; the training module turns it on for
single-process training only (`lit_matmamba.training.parallel`).
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


def nested_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: slice = slice(None),
    cols: int | None = None,
) -> torch.Tensor:
    """`F.linear(x, weight[rows, :cols], bias[rows])`. x: (..., cols) -> (..., rows)."""
    direct = (
        _DIRECT.get()
        and torch.is_grad_enabled()
        and weight.requires_grad
        and weight.is_leaf
        and (bias is None or (bias.requires_grad and bias.is_leaf))
    )
    if not direct:
        return F.linear(x, weight[rows, :cols], None if bias is None else bias[rows])
    return _DirectGradLinear.apply(x, weight, bias, rows, cols)


def _accumulate(param: torch.Tensor, index: tuple, grad: torch.Tensor) -> None:
    if param.grad is None:
        param.grad = torch.zeros_like(param, memory_format=torch.contiguous_format)
    param.grad[index].add_(grad)


class _DirectGradLinear(torch.autograd.Function):
    """Returns no gradient for weight and bias: backward adds them into `.grad[block]` itself."""

    @staticmethod
    def forward(ctx, x, weight, bias, rows, cols):
        w = weight[rows, :cols]  # (R, C) view
        b = None if bias is None else bias[rows]
        device = x.device.type
        if torch.is_autocast_enabled(device):  # cast as autocast would, once per call
            dtype = torch.get_autocast_dtype(device)
            x, w = x.to(dtype), w.to(dtype)
            b = None if b is None else b.to(dtype)
        y = F.linear(x, w, b)  # (..., R)
        ctx.save_for_backward(x, w)
        ctx.weight, ctx.bias, ctx.index = weight, bias, (rows, slice(None, cols))
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors  # in the compute dtype
        dy = dy.to(w.dtype)
        dx = dy @ w if ctx.needs_input_grad[0] else None  # (..., C)
        dy2 = dy.reshape(-1, dy.shape[-1])  # (T, R)
        _accumulate(ctx.weight, ctx.index, dy2.t() @ x.reshape(-1, x.shape[-1]))  # (R, C)
        if ctx.bias is not None:
            _accumulate(
                ctx.bias, ctx.index[:1], dy2.sum(0, dtype=torch.promote_types(dy.dtype, torch.float32))
            )
        return dx, None, None, None, None
