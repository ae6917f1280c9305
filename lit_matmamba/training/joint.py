"""The joint training step of a nested model, written once, in plain PyTorch.

Every granularity runs forward and backward on the same batch, one width after the other, and
the gradients of all of them add up in `.grad` before one optimizer step. Each width's loss is
back-propagated right away, so only one width's activations are alive at a time: the joint step's
peak memory is the widest width's, not the sum over widths.

The training module (eager and CUDA-graphed), the benchmarks and the tests call `joint_backward`;
clipping (`parallel.clip_grad_norm`) and the optimizer step come after it, outside.
`capture_joint_step` captures it, with the clipping, as one CUDA graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from lit_matmamba.graphs import GraphedTrainStep, graph_autocast
from lit_matmamba.models.config import Width
from lit_matmamba.models.nested_linear import direct_weight_grads as direct_grads

# (batch, width) -> the 0-d loss of the sub-model of that width on the batch.
LossFn = Callable[[Any, Width], torch.Tensor]


def joint_backward(
    loss_fn: LossFn,
    batch: Any,
    widths: Sequence[Width],
    weights: Sequence[float],
    *,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    gradient_sync: Callable[[bool], contextlib.AbstractContextManager] | None = None,
    sync_last: bool = True,
    direct_weight_grads: bool = False,
) -> torch.Tensor:
    """Forward and backward of `weights[i] * loss_fn(batch, widths[i])` for every i, in order;
    returns the unweighted losses, detached, (len(widths),).

    Args:
        loss_fn: the model's own loss at a width (e.g. `lambda b, w: model.loss(b, w)`).
        batch: what `loss_fn` takes.
        widths: the widths to train, usually the granularities.
        weights: one factor per width; fold any scaling (1 / accumulation) into them.
        backward: runs the backward of a weighted loss (Lightning's `manual_backward`, so that its
            precision plugin scales fp16 losses).
        gradient_sync: `gradient_sync(enabled)` is a context in which backward passes reduce
            gradients across ranks or not (`parallel.gradient_sync`); None in one process.
        sync_last: reduce on the last width's backward (the last micro-batch of an optimizer step);
            the other widths never reduce, so gradients are reduced once per optimizer step, not
            once per width.
        direct_weight_grads: add each width's weight gradients straight into the used block of
            `.grad` (`lit_matmamba.models.nested_linear`); one process only.
    """
    if len(widths) != len(weights):
        raise ValueError(f"{len(widths)} widths but {len(weights)} weights")
    losses = []
    last = len(widths) - 1
    for i, (width, weight) in enumerate(zip(widths, weights)):
        sync = gradient_sync(sync_last and i == last) if gradient_sync else contextlib.nullcontext()
        with sync, direct_grads(direct_weight_grads):
            loss = loss_fn(batch, width)
            backward(loss * weight)
        losses.append(loss.detach())
    return torch.stack(losses)


def capture_joint_step(
    loss_fn: LossFn,
    example: Any,
    widths: Sequence[Width],
    weights: Sequence[float],
    params: Iterable[torch.Tensor],
    *,
    max_grad_norm: float | None = 1.0,
    autocast_dtype: torch.dtype | None = torch.bfloat16,
    direct_weight_grads: bool = True,
) -> GraphedTrainStep:
    """The joint step (`joint_backward`) and gradient clipping captured as one CUDA graph for
    batches shaped like `example` (one GPU, one process). Call the result with a batch: it
    returns the per-width losses and the gradient norm and leaves the gradients in `.grad` for the
    optimizer, which runs outside the graph.

    Example:
        step = capture_joint_step(model.loss, ids, [768, 384, 192, 96], [0.25] * 4, model.parameters())
        losses, grad_norm = step(ids)  # (4,), ()
        optimizer.step()
    """

    def loss_in_autocast(batch: Any, width: Width) -> torch.Tensor:
        with graph_autocast(autocast_dtype):
            return loss_fn(batch, width)

    def forward_backward(batch: Any) -> torch.Tensor:
        return joint_backward(
            loss_in_autocast, batch, widths, weights, direct_weight_grads=direct_weight_grads
        )

    return GraphedTrainStep(forward_backward, example, params, max_grad_norm)
