"""CUDA graphs for nested models: one capture per width (inference) or per joint step (training).

A small sub-model launches as many kernels as the full one, each doing less work, so at small
widths the step is bound by kernel launches, not by the GPU. Replaying a captured CUDA graph
launches the whole step at once. Shapes are fixed at capture; inputs are copied into static
buffers before each replay.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

Width = int | Sequence[int] | None


def _warmup(fn: Callable[[], object], iters: int = 3) -> None:
    """Run on a side stream before capture, as torch.cuda.graphs requires (lazy init, autotuning)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(iters):
            fn()
    torch.cuda.current_stream().wait_stream(stream)


class GraphedForward:
    """`model(inputs, width)` without gradients, captured for one input shape.

    Example:
        fwd = GraphedForward(model, example_ids, width=256)
        logits = fwd(ids)  # same shape as example_ids; returns a static buffer (clone to keep)
    """

    def __init__(
        self,
        model: nn.Module,
        example: torch.Tensor,
        width: Width = None,
        autocast_dtype: torch.dtype | None = torch.bfloat16,
    ) -> None:
        self.static_input = example.clone()
        self.width = width

        def run() -> torch.Tensor:
            with (
                torch.no_grad(),
                torch.autocast(
                    "cuda", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
                ),
            ):
                return model(self.static_input, width=width)

        _warmup(run)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_output = run()

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        self.static_input.copy_(inputs)
        self.graph.replay()
        return self.static_output


class GraphedJointStep:
    """One joint training step captured whole: for every width, forward and backward of
    `weight * loss_fn(model, batch, width)`, then gradient clipping and `optimizer.step()`.

    The optimizer must be capturable (e.g. `torch.optim.AdamW(..., capturable=True)`).
    Returns the static per-width loss tensor (len(widths),) of the last replay.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        example: torch.Tensor,
        widths: Sequence[Width],
        weights: Sequence[float],
        loss_fn: Callable[[nn.Module, torch.Tensor, Width], torch.Tensor],
        max_grad_norm: float | None = 1.0,
        autocast_dtype: torch.dtype | None = torch.bfloat16,
    ) -> None:
        self.static_input = example.clone()
        params = [p for p in model.parameters() if p.requires_grad]

        def step() -> torch.Tensor:
            losses = []
            for width, weight in zip(widths, weights):
                with torch.autocast(
                    "cuda", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
                ):
                    loss = loss_fn(model, self.static_input, width)
                (loss * weight).backward()
                losses.append(loss.detach())
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=True)
            optimizer.step()
            return torch.stack(losses)

        # Warm-up steps change the weights; callers time or train from here on, as after any step.
        optimizer.zero_grad(set_to_none=True)
        _warmup(lambda: (step(), optimizer.zero_grad(set_to_none=True)))
        # Gradients are None at capture, so the first backward in the graph writes them and the
        # rest accumulate: every replay starts from fresh gradients without a zero_grad.
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_losses = step()

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.static_input.copy_(batch)
        self.graph.replay()
        return self.static_losses
