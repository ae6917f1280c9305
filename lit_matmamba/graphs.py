"""CUDA graphs for nested models: one capture per width (inference), per width and batch bucket
(decoding), or per joint step (training).

A small sub-model launches as many kernels as the full one, each doing less work, so at small
widths the step is bound by kernel launches, not by the GPU. Replaying a captured CUDA graph
launches the whole step at once. Shapes are fixed at capture; inputs are copied into static
buffers before each replay. The training side captures the joint step of every granularity
(`lit_matmamba.training.joint.capture_joint_step`) through `GraphedTrainStep`; decoding captures
`MatMambaLM.step` through `GraphedDecoder`, which `generate`, the server and `bench decode` share.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map

from lit_matmamba.models.backbone import InferenceCache
from lit_matmamba.models.config import Width
from lit_matmamba.models.mixer import MixerState

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


class GraphedDecoder:
    """Decoding steps of a language model at one width for up to `batch_size` rows (slots), on a
    recurrent state preallocated for them: `model.step` captured as a CUDA graph for each batch
    bucket, or run eagerly (without CUDA, or with `cuda_graphs=False`).

    The state (`self.cache`, `batch_size` rows at `width`) is allocated once. A step advances rows
    [0, n): `prefill` runs prompts into slots (`load` copies in rows prefilled elsewhere), `move`
    copies a row into another slot (a server keeps its active rows leading), `step(tokens)`
    returns their logits. Graphed, a step of n rows replays the graph of the smallest bucket
    b >= n (`buckets`, default the powers of two below `batch_size` and `batch_size` itself), which
    reads and writes rows [0, b) of the same state in place: rows n..b-1 compute on whatever they
    hold and are ignored (every op is per row). Eager, the step runs on exactly n rows. Both run `_run`: the model's own step on views of the state,
    with any new state tensors the step returns copied back (the GPU kernels write in place).

    `ssm_dtype`: the SSM state's dtype (default as `allocate_cache`: float32, float64 for a float64
    model; stock mamba-ssm keeps it in the weights' dtype, bf16 halves its memory traffic). The graphs read the
    model's parameters as they are at each replay; the model must not change dtype or device.

    Example:
        dec = GraphedDecoder(model, width=64, batch_size=8)
        logits = dec.prefill(prompts)  # 3 prompts, into rows 0..2
        logits = dec.step(next_tokens)  # (3, V): a view of the graph's output buffer, valid until
                                        # the next step (clone to keep)
    """

    def __init__(
        self,
        model: nn.Module,
        width: Width,
        batch_size: int,
        ssm_dtype: torch.dtype | None = None,
        cuda_graphs: bool | None = None,
        buckets: Iterable[int] | None = None,
    ) -> None:
        device = model.backbone.embedding.weight.device
        if cuda_graphs is None:
            cuda_graphs = device.type == "cuda"
        if cuda_graphs and device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, not {device}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model, self.batch_size = model, batch_size
        self.cache = model.allocate_cache(batch_size, width, device=device, ssm_dtype=ssm_dtype)
        self.widths = self.cache.widths
        self.tokens = torch.zeros(batch_size, dtype=torch.long, device=device)  # the graphs' input
        if buckets is None:
            buckets = [1 << i for i in range(batch_size.bit_length()) if 1 << i < batch_size]
        self.buckets = sorted({*buckets, batch_size})
        if self.buckets[0] < 1 or self.buckets[-1] > batch_size:
            raise ValueError(f"buckets must lie in 1..{batch_size}, got {self.buckets}")
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if cuda_graphs:
            # All captured now: warming up a bucket writes junk into its rows, harmless only while
            # no row holds a sequence.
            for b in self.buckets:
                _warmup(lambda b=b: self._run(b))
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    logits = self._run(b)
                self.graphs[b] = (graph, logits)

    @property
    def cuda_graphs(self) -> bool:
        return bool(self.graphs)

    @torch.no_grad()
    def _run(self, n: int) -> torch.Tensor:
        """`model.step` on rows [0, n) of the state, in place; logits (n, V)."""
        rows = [MixerState(s.conv[:n], s.ssm[:n]) for s in self.cache.states]
        views = InferenceCache(self.widths, [MixerState(r.conv, r.ssm) for r in rows])
        logits = self.model.step(self.tokens[:n], views)
        for row, new in zip(rows, views.states):
            if new.conv is not row.conv:  # the reference ops return new tensors
                row.conv.copy_(new.conv)
            if new.ssm is not row.ssm:
                row.ssm.copy_(new.ssm)
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """The next tokens (n,) of rows [0, n) -> their logits (n, V), state advanced in place."""
        n = tokens.shape[0]
        if not 0 < n <= self.batch_size:
            raise ValueError(f"a step takes 1 to {self.batch_size} tokens, got {n}")
        self.tokens[:n].copy_(tokens)
        if not self.graphs:
            return self._run(n)
        graph, logits = self.graphs[next(b for b in self.buckets if b >= n)]
        graph.replay()
        return logits[:n]

    def prefill(self, prompts: Sequence[torch.Tensor], start: int = 0) -> torch.Tensor:
        """`model.prefill` of `prompts` (1-D, any lengths) into rows [start, start + len(prompts)),
        on a cache allocated in this decoder's dtypes; returns the logits after each prompt, (n, V)."""
        ssm_dtype = self.cache.states[0].ssm.dtype
        device = self.tokens.device
        cache = self.model.allocate_cache(len(prompts), self.widths, device=device, ssm_dtype=ssm_dtype)
        logits = self.model.prefill(prompts, cache)  # (n, V)
        self.load(cache, start)
        return logits

    @torch.no_grad()
    def load(self, cache: InferenceCache, start: int = 0) -> None:
        """Copy the rows of a prefilled cache (same widths) into rows [start, start + its rows)."""
        if cache.widths != self.widths:
            raise ValueError(f"the cache holds widths {cache.widths}, the decoder runs {self.widths}")
        n = cache.states[0].conv.shape[0]
        if start < 0 or start + n > self.batch_size:
            raise ValueError(f"rows {start}..{start + n - 1} do not fit {self.batch_size} rows")
        for mine, theirs in zip(self.cache.states, cache.states):
            mine.conv[start : start + n].copy_(theirs.conv)
            mine.ssm[start : start + n].copy_(theirs.ssm)

    @torch.no_grad()
    def move(self, src: int, dst: int) -> None:
        """Copy row `src`'s state into row `dst`."""
        for state in self.cache.states:
            state.conv[dst].copy_(state.conv[src])
            state.ssm[dst].copy_(state.ssm[src])


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
