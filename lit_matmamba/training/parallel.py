"""Everything about distributed gradients in one place.

MatMamba's training step runs one forward and backward per granularity on the same batch and
takes one optimizer step. Without care, DDP and FSDP all-reduce (or reduce-scatter) gradients
after *every* backward, i.e. once per granularity. `gradient_sync(module, enabled)` turns that off
for all but the last backward of an optimizer step.

`direct_weight_grads` (lit_matmamba.models.nested_linear) writes weight gradients past autograd's
parameter hooks, which DDP and FSDP reduce through; `is_distributed` says when it must stay off.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch
from torch import nn


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Run backward passes inside with gradient reduction across ranks on (`enabled`) or off.

    Works for DDP and FSDP1 (`no_sync()`), FSDP2 (`set_requires_gradient_sync`) and plain
    modules (nothing to do).
    """
    if enabled:
        yield
        return
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2 (fully_shard)
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    elif hasattr(module, "no_sync"):  # DistributedDataParallel, FullyShardedDataParallel
        with module.no_sync():
            yield
    else:
        yield


def is_distributed(module: nn.Module) -> bool:
    """Whether gradients of `module` (the strategy's model, maybe a wrapper) are reduced across
    processes: a DDP/FSDP wrapper, or an initialised process group of more than one rank."""
    wrapped = hasattr(module, "no_sync") or hasattr(module, "set_requires_gradient_sync")
    multi = torch.distributed.is_available() and torch.distributed.is_initialized()
    return wrapped or (multi and torch.distributed.get_world_size() > 1)


def clip_grad_norm(
    module: nn.Module, parameters: Iterable[torch.Tensor], max_norm: float | None
) -> torch.Tensor:
    """Clip the global gradient norm to `max_norm` (None or 0: only measure it); returns the norm
    before clipping. FSDP1 computes it across shards with its own `clip_grad_norm_`."""
    limit = max_norm if max_norm else math.inf
    if hasattr(module, "clip_grad_norm_"):  # FullyShardedDataParallel
        return module.clip_grad_norm_(limit)
    return torch.nn.utils.clip_grad_norm_([p for p in parameters if p.grad is not None], limit)
