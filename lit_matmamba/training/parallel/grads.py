"""Gradients across processes: reduced once per optimizer step, clipped by their global norm.

The joint step runs one forward and backward per granularity on the same batch and takes one
optimizer step. Without care, DDP and FSDP all-reduce (or reduce-scatter) gradients after
*every* backward, i.e. once per granularity. `gradient_sync(module, enabled)` turns that off for
all but the last backward of an optimizer step.

`direct_weight_grads` (lit_matmamba.models.nested_linear) writes weight gradients past autograd's
parameter hooks, which DDP and FSDP reduce through; `is_distributed` says when it must stay off.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch
from torch import nn


def _fsdp2_roots(module: nn.Module) -> list[nn.Module]:
    """The outermost modules under `module` (itself included) that `fully_shard` wrapped."""
    from torch.distributed.fsdp import FSDPModule

    roots: list[tuple[str, nn.Module]] = []
    for name, m in module.named_modules():
        if isinstance(m, FSDPModule) and not any(name.startswith(f"{r}.") or r == "" for r, _ in roots):
            roots.append((name, m))
    return [m for _, m in roots]


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Run backward passes inside with gradient reduction across ranks on (`enabled`) or off.

    `module` is what the strategy trains: a DDP or FSDP1 wrapper (`no_sync()`), or a module holding
    FSDP2 modules (`fully_shard`, `set_requires_gradient_sync`) such as the LightningModule under
    ModelParallelStrategy, or a plain module (nothing to do). Tensor parallelism has nothing to
    turn off: its collectives are part of the forward and backward of every width.
    """
    if enabled:
        yield
        return
    roots = _fsdp2_roots(module) if torch.distributed.is_available() else []
    if roots:
        for root in roots:
            root.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            for root in roots:
                root.set_requires_gradient_sync(True)
    elif hasattr(module, "no_sync"):  # DistributedDataParallel, FullyShardedDataParallel
        with module.no_sync():
            yield
    else:
        yield


def is_distributed(module: nn.Module) -> bool:
    """Whether gradients of `module` (the strategy's model, maybe a wrapper) go through a
    distributed reduction or sharding: a DDP/FSDP wrapper, FSDP2 or tensor-parallel parameters
    inside (DTensors, even on one process), or an initialised process group of more than one rank."""
    from torch.distributed.tensor import DTensor

    wrapped = hasattr(module, "no_sync") or hasattr(module, "set_requires_gradient_sync")
    sharded = any(isinstance(p, DTensor) for p in module.parameters())
    multi = torch.distributed.is_available() and torch.distributed.is_initialized()
    return wrapped or sharded or (multi and torch.distributed.get_world_size() > 1)


def clip_grad_norm(
    module: nn.Module, parameters: Iterable[torch.Tensor], max_norm: float | None
) -> torch.Tensor:
    """Clip the global gradient norm to `max_norm` (None or 0: only measure it); returns the norm
    before clipping, the same on every rank.

    Plain gradients (one process, DDP, or a tensor-parallel replica) count as they are. DTensor
    gradients (FSDP2 shards, tensor-parallel shards, or both on a 2-D mesh) count once each: the
    squares of a gradient's local shard are summed over the mesh dimensions it is sharded along,
    and not over those it is replicated along. FSDP1 uses its own `clip_grad_norm_`.
    """
    limit = max_norm if max_norm else math.inf
    if hasattr(module, "clip_grad_norm_"):  # FullyShardedDataParallel
        return module.clip_grad_norm_(limit)
    params = [p for p in parameters if p.grad is not None]
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p.grad, DTensor) for p in params):
        return torch.nn.utils.clip_grad_norm_(params, limit)
    total = _sharded_norm([p.grad for p in params])
    if limit < math.inf:
        coef = torch.clamp(limit / (total + 1e-6), max=1.0)
        grads = [g.to_local() if isinstance(g, DTensor) else g for g in (p.grad for p in params)]
        for g in grads:
            g.mul_(coef.to(g.device, g.dtype))
    return total


def _sharded_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all of `grads` (plain tensors and DTensors on any meshes), float32."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    # Group by mesh and placements, so that one all-reduce per mesh dimension serves a group.
    groups: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        key = (g.device_mesh, tuple(g.placements)) if isinstance(g, DTensor) else None
        groups.setdefault(key, []).append(g.to_local() if isinstance(g, DTensor) else g)
    total = None
    for key, local in groups.items():
        squares = torch.stack([n.float() for n in torch._foreach_norm(local)]).pow(2).sum()
        if key is not None:
            mesh, placements = key
            for dim, placement in enumerate(placements):
                if _splits(placement):
                    dist.all_reduce(squares, group=mesh.get_group(dim))
        total = squares if total is None else total + squares.to(total.device)
    return total.sqrt()


def _splits(placement: object) -> bool:
    """Whether a DTensor placement splits the tensor over its mesh dimension: Shard, or the
    _StridedShard FSDP2 uses over a tensor-parallel shard (which is not a Shard subclass)."""
    from torch.distributed.tensor.placement_types import _StridedShard

    return placement.is_shard() or isinstance(placement, _StridedShard)
