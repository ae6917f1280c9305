"""CUDA graphs for nested models: one capture per width (inference) or per joint step (training).

A small sub-model launches as many kernels as the full one, each doing less work, so at small
widths the step is bound by kernel launches, not by the GPU. Replaying a captured CUDA graph
launches the whole step at once. Shapes are fixed at capture; inputs are copied into static
buffers before each replay. The training side captures the joint step of every granularity
(`lit_matmamba.training.joint.capture_joint_step`) through `GraphedTrainStep`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map

from lit_matmamba.models.config import Width

Batch = torch.Tensor | tuple | list | dict


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

    With `frozen_weights` (for serving), the graph reads a snapshot of the parameters taken at
    capture, with the `nn.Linear` weights in it cast to the autocast dtype: replaying autocast's
    casts would re-read every float32 weight on each call (3.5% of the kernel time of a
    full-width lm-1.4b forward on an H200). The graph serves the snapshot until `refresh()`: an optimizer step or `load_state_dict` afterwards is not
    seen (fused AdamW does not even bump the version counters, so it cannot be detected cheaply).
    The snapshot costs 2 bytes per linear weight and a copy of the other parameters. Without it
    (default), every replay reads the current parameters and casts, as an eager autocast forward.

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
        frozen_weights: bool = False,
    ) -> None:
        if frozen_weights and autocast_dtype is None:
            raise ValueError("frozen_weights casts the weights to autocast_dtype: give one")
        self.static_input = example.clone()
        self.width = width
        self.snapshot = _Snapshot(model, autocast_dtype) if frozen_weights else None
        overrides = self.snapshot.tensors if self.snapshot else {}

        def run() -> torch.Tensor:
            with torch.no_grad(), graph_autocast(autocast_dtype):
                # tie_weights=False: a tied embedding reads its float32 copy, the head the cast one.
                return torch.func.functional_call(
                    model, overrides, (self.static_input,), {"width": width}, tie_weights=False, strict=False
                )

        _warmup(run)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_output = run()

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        self.static_input.copy_(inputs)
        self.graph.replay()
        return self.static_output

    def refresh(self) -> None:
        """With `frozen_weights`: copy the model's current parameters into the snapshot the graph reads."""
        if self.snapshot:
            self.snapshot.refresh()


class _Snapshot:
    """Copies of a model's parameters (name -> tensor, tied ones under each name), `nn.Linear`
    weights and biases cast to `dtype` as autocast would cast them for the GEMMs."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        linear = {
            f"{name}.{attr}" if name else attr
            for name, m in model.named_modules()
            if isinstance(m, nn.Linear)
            for attr in ("weight", "bias")
        }
        self.sources = dict(model.named_parameters(remove_duplicate=False))
        self.tensors = {
            # copy=True: a weight already in `dtype` must not be aliased, or the snapshot would follow it.
            name: p.detach().to(dtype, copy=True)
            if name in linear and p.is_floating_point()
            else p.detach().clone()
            for name, p in self.sources.items()
        }

    def refresh(self) -> None:
        for name, p in self.sources.items():
            self.tensors[name].copy_(p.detach())  # in place: captured graphs read these buffers


class GraphedTrainStep:
    """A training step's forward and backward, then gradient clipping, captured as one CUDA graph;
    the optimizer steps outside it.

    `forward_backward(batch)` runs the forward and backward passes and returns the losses (a
    tensor); for a nested model that is the joint step, `lit_matmamba.training.joint.capture_joint_step`
    builds this. Its autocast must not cache weight casts: use `graph_autocast`, since a cast cached
    outside the capture would be replayed stale.

    Capture needs fixed shapes: the batch (a tensor or a tuple/list/dict of tensors) is copied into
    static buffers before each replay. After a call, every parameter's `.grad` holds this step's
    gradients (written afresh, not accumulated across calls), ready for any optimizer's `step()`.
    The optimizer stays out of the graph so that learning-rate schedules, non-capturable optimizers
    and the trainer's step counting work as usual; its one or few launches cost little. Warm-up
    (autotuning, lazy initialisation) runs forward and backward only: the weights do not change
    before the first call.
    """

    def __init__(
        self,
        forward_backward: Callable[[Batch], torch.Tensor],
        example: Batch,
        params: Iterable[torch.Tensor],
        max_grad_norm: float | None = 1.0,
    ) -> None:
        if not all(isinstance(t, torch.Tensor) for t in tree_leaves(example)):
            raise TypeError(
                "a batch for CUDA graphs holds tensors in tuples, lists and dicts, and nothing else"
            )
        self.static_batch = tree_map(torch.clone, example)
        self.params = [p for p in params if p.requires_grad]
        limit = max_grad_norm if max_grad_norm else math.inf

        def step() -> tuple[torch.Tensor, torch.Tensor]:
            losses = forward_backward(self.static_batch)
            norm = torch.nn.utils.clip_grad_norm_(self.params, limit, foreach=True)
            return losses, norm

        def clear_grads() -> None:
            for p in self.params:
                p.grad = None

        clear_grads()
        _warmup(lambda: (step(), clear_grads()))
        # Gradients are None at capture, so the first backward in the graph writes them (autograd
        # or `direct_weight_grads` allocates them in the graph's memory) and the rest accumulate:
        # every replay starts from fresh gradients without a zero_grad.
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_losses, self.static_norm = step()
        self.static_grads = [p.grad for p in self.params]  # None for parameters the loss does not use

    def __call__(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Replays the step on `batch` (same shapes as the example); returns the losses and the
        gradient norm before clipping (static buffers, overwritten by the next call: clone to keep)."""
        if not self.matches(batch):
            raise ValueError("the batch's structure, shapes or dtypes differ from the captured example's")
        for static, new in zip(tree_leaves(self.static_batch), tree_leaves(batch)):
            static.copy_(new)
        self.graph.replay()
        # Re-attach the graph's gradient buffers, which a zero_grad(set_to_none=True) may have dropped.
        for p, g in zip(self.params, self.static_grads):
            p.grad = g
        return self.static_losses, self.static_norm

    def matches(self, batch: Batch) -> bool:
        """Whether `batch` has the captured shapes and dtypes (else run an eager step)."""
        return _spec(batch) == _spec(self.static_batch)


def graph_autocast(dtype: torch.dtype | None) -> torch.autocast:
    """CUDA autocast to `dtype` (None: off) without the weight-cast cache, for code run inside a
    CUDA graph capture: a cast cached outside the capture would be replayed stale."""
    return torch.autocast(
        "cuda", dtype=dtype or torch.float32, enabled=dtype is not None, cache_enabled=False
    )


def _spec(batch: Batch) -> tuple:
    """What must not change between the captured batch and a replayed one: structure, shapes, dtypes."""
    leaves, tree = tree_flatten(batch)
    return tree, [(tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else type(t) for t in leaves]
