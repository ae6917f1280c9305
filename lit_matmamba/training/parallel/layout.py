"""Checkpoints keep one layout, whatever the sharding: conversions between stored and canonical.

A sharded parameter is a DTensor whose global view is its *stored* layout: for FSDP2 the mixer's
internal layout (`models/mixer.py`: every width a prefix), for tensor parallelism the concatenation
of the ranks' local blocks (`tensor_parallel.py`: heads dealt out round-robin). Checkpoints hold the
*canonical* layout, the one a model on one process writes:

- model state (`state_dict()`): mamba-ssm's layout, as `MatMambaMixer.state_dict()` gives it;
- optimizer state: the parameters' internal layout, as a one-process optimizer holds it.

Both are a permutation of the stored tensor along one dimension: `stored = canonical.index_select(
dim, index)` (`Layout`). Hooks on the module that owns each parameter (and on the optimizer) convert
on save and on load: the owning module, not the mixer, because Lightning loads a single-file
checkpoint into a sharded model one submodule at a time. A canonical tensor in a state dict is a
DTensor sharded along dim 0 over the same mesh (so a distributed checkpoint writes each piece once),
or a plain tensor when it comes from a single-file checkpoint. The conversion gathers one parameter
at a time, so it needs one full parameter of memory on each rank, not the full model.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True, eq=False)
class Layout:
    """`stored = canonical.index_select(dim, index)`; index None: stored as canonical."""

    dim: int
    index: torch.Tensor | None
    inverse: torch.Tensor | None = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "inverse", None if self.index is None else torch.argsort(self.index))

    def then(self, other: Layout) -> Layout:
        """The layout of `other` applied to a tensor stored in this one (same dimension)."""
        if other.index is None:
            return self
        if self.index is None:
            return other
        return Layout(self.dim, self.index[other.index])

    def to_canonical(self, stored: torch.Tensor) -> torch.Tensor:
        """A stored parameter (plain or DTensor) in the canonical layout, sharded as described in
        the module docstring."""
        from torch.distributed.tensor import DTensor, Shard, distribute_tensor

        if not isinstance(stored, DTensor):
            return (
                stored
                if self.index is None
                else stored.index_select(self.dim, self.inverse.to(stored.device))
            )
        if self.index is None and all(p == Shard(0) for p in stored.placements):
            return stored
        full = stored.full_tensor()
        if self.index is not None:
            full = full.index_select(self.dim, self.inverse.to(full.device))
        mesh = stored.device_mesh
        return distribute_tensor(full, mesh, [Shard(0)] * mesh.ndim, src_data_rank=None)

    def to_stored(self, canonical: Any, like: torch.Tensor) -> Any:
        """A canonical tensor (plain or DTensor of any sharding) in the layout and sharding of the
        parameter `like`. Tensors of another shape are returned as they are (load_state_dict then
        reports the mismatch)."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        if not isinstance(canonical, torch.Tensor) or tuple(canonical.shape) != tuple(like.shape):
            return canonical
        full = canonical.full_tensor() if isinstance(canonical, DTensor) else canonical
        full = full.to(like.device)
        if self.index is not None:
            full = full.index_select(self.dim, self.index.to(full.device))
        if isinstance(like, DTensor):
            return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)
        return full


def register(owner: nn.Module, layouts: dict[str, Layout]) -> None:
    """Convert the parameters of `owner` named in `layouts` on `state_dict()` and
    `load_state_dict()`. Call after the parameters are final (sharded)."""
    owner.register_state_dict_post_hook(functools.partial(_save_hook, layouts))
    owner.register_load_state_dict_pre_hook(functools.partial(_load_hook, layouts))


def _save_hook(
    layouts: dict[str, Layout], module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict
) -> None:
    for name, layout in layouts.items():
        if prefix + name in state_dict:
            state_dict[prefix + name] = layout.to_canonical(state_dict[prefix + name])


def _load_hook(
    layouts: dict[str, Layout], module: nn.Module, state_dict: dict, prefix: str, *args: Any
) -> None:
    for name, layout in layouts.items():
        value = state_dict.get(prefix + name)
        if value is None:
            continue
        if value is module._parameters[name] and not prefix:
            # torch.distributed's set_model_state_dict hands over the parameters themselves: the
            # one being loaded holding the canonical tensor, the others their stored one. Called
            # on the owning module itself (prefix ""), as ModelParallelStrategy loads a single file,
            # one parameter at a time, the others' would be converted too: refuse.
            raise RuntimeError(
                "a sharded MatMamba model cannot be loaded one parameter at a time, as "
                "ModelParallelStrategy loads a single-file checkpoint: give it a distributed "
                "checkpoint (main.py converts a single file for you; in Python: "
                "lit_matmamba.training.parallel.to_distributed_checkpoint(path, directory)), or load "
                "the whole state dict at once"
            )
        state_dict[prefix + name] = layout.to_stored(value, module._parameters[name])


def register_optimizer(optimizer: torch.optim.Optimizer, layouts: dict[torch.Tensor, Layout]) -> None:
    """Keep the optimizer's state of the parameters in `layouts` (parameter -> its stored layout
    relative to the canonical optimizer-state layout) canonical in its state dict
    (`optimizer.state_dict()`, and the distributed state dicts of `torch.distributed.checkpoint`,
    which call it)."""
    layouts = {p: lay for p, lay in layouts.items() if lay.index is not None}
    if layouts:
        optimizer.register_state_dict_post_hook(functools.partial(_convert_optimizer_state, layouts, True))
        optimizer.register_load_state_dict_pre_hook(
            functools.partial(_convert_optimizer_state, layouts, False)
        )


def _state_by_param(optimizer: torch.optim.Optimizer, state_dict: dict) -> list[tuple[Any, torch.Tensor]]:
    """(key in state_dict["state"], parameter) pairs: the saved groups list their keys (ids or
    names) in the order of the optimizer's own groups."""
    pairs = []
    for saved, group in zip(state_dict["param_groups"], optimizer.param_groups):
        pairs.extend(zip(saved["params"], group["params"]))
    return pairs


def _convert_optimizer_state(
    layouts: dict[torch.Tensor, Layout], save: bool, optimizer: torch.optim.Optimizer, state_dict: dict
) -> dict:
    for key, param in _state_by_param(optimizer, state_dict):
        layout = layouts.get(param)
        entry = state_dict["state"].get(key)
        if layout is None or entry is None:
            continue
        # A new entry: optimizer.state_dict() hands out the optimizer's own per-parameter dicts.
        state_dict["state"][key] = {
            name: _convert(layout, value, param, save) for name, value in entry.items()
        }
    return state_dict


def _convert(layout: Layout, value: Any, param: torch.Tensor, save: bool) -> Any:
    """One entry of a parameter's optimizer state: exp_avg, exp_avg_sq, ... are converted, the 0-d
    step and anything not shaped like the parameter are not."""
    if not (isinstance(value, torch.Tensor) and value.ndim > 0 and tuple(value.shape) == tuple(param.shape)):
        return value
    return layout.to_canonical(value) if save else layout.to_stored(value, param)
