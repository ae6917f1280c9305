"""`parallelize`: the one entry point that shards a MatMamba model over a device mesh.

Applied from `NestedModule.configure_model()` under Lightning's `ModelParallelStrategy`, whose
device mesh has the dimensions ("data_parallel", "tensor_parallel"):

1. tensor parallelism over "tensor_parallel" (size > 1): every mixer's heads are dealt out over
   the ranks (`tensor_parallel.py`); the rest of the model is replicated;
2. activation checkpointing per block (optional): each block's activations are recomputed in
   the backward;
3. FSDP2 (`fully_shard`) over "data_parallel", per block and then the root (when its size is
   above 1, or when there is no tensor parallelism: a model on a mesh of one shards trivially);
   with `mixed_precision="bf16"` parameters are all-gathered and computed in bf16 and gradients
   reduced in float32;
4. the weights: rank 0's are broadcast into every rank's shards, so the model may be on the meta
   device on the other ranks (`main.py` builds it there) and every rank starts from the same
   weights, those a one-process run with the same seed starts from;
5. checkpoint hooks (`layout.py`): state dicts and optimizer state stay canonical.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from itertools import chain
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from lit_matmamba.models.backbone import Block
from lit_matmamba.models.config import Width
from lit_matmamba.models.mixer import MatMambaMixer

from . import layout
from .layout import Layout
from .tensor_parallel import (
    ShardedMixer,
    TensorParallelMixer,
    _mesh_device,
    check_tensor_parallel,
    mamba_layouts,
    shard_mixer,
    swap_class,
    tensor_parallel_layouts,
)

MIXED_PRECISION = {"bf16": torch.bfloat16}


def mesh_dims(device_mesh: Any) -> tuple[Any, Any]:
    """(data-parallel mesh, tensor-parallel mesh) of a device mesh: Lightning's 2-D mesh
    ("data_parallel", "tensor_parallel") or a 1-D mesh with one of those names; None for a
    dimension the mesh lacks."""
    names = device_mesh.mesh_dim_names or ()
    unknown = set(names) - {"data_parallel", "tensor_parallel"}
    if unknown or not names:
        raise ValueError(
            f"parallelize needs a mesh with dimensions named 'data_parallel' and/or 'tensor_parallel' "
            f"(ModelParallelStrategy's), got {names or 'an unnamed mesh'}"
        )
    return tuple(
        device_mesh[name] if name in names else None for name in ("data_parallel", "tensor_parallel")
    )


def parallelize(
    model: nn.Module,
    device_mesh: Any | None,
    *,
    widths: Sequence[Width] = (),
    activation_checkpointing: bool = False,
    mixed_precision: str | None = None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard `model` (a `MatMambaLM` or `MatMambaVision`) over `device_mesh` in place and return it
    (module docstring). Without a mesh, only activation checkpointing applies.

    Args:
        model: the plain-PyTorch model, with rank 0's weights real (the other ranks' may be on the
            meta device).
        device_mesh: ModelParallelStrategy's mesh (`LightningModule.device_mesh`), or None.
        widths: the widths that will run (granularities, evaluated widths): tensor parallelism
            checks that it can spread each evenly over its ranks.
        activation_checkpointing: recompute each block's activations in the backward.
        mixed_precision: "bf16": FSDP2 computes in bf16 and reduces gradients in float32, the
            parameters and optimizer state stay float32. Needs FSDP (see above).
        reshard_after_forward: FSDP2 frees the gathered parameters of a block after its forward
            (and gathers them again for the backward); False keeps them, trading memory for
            communication.
    """
    if mixed_precision is not None and mixed_precision not in MIXED_PRECISION:
        raise ValueError(
            f"mixed_precision must be None or one of {sorted(MIXED_PRECISION)}, got {mixed_precision!r}"
        )
    blocks = list(model.backbone.layers)
    if device_mesh is None:
        if mixed_precision is not None:
            raise ValueError("mixed_precision is FSDP2's: use it with ModelParallelStrategy")
        if activation_checkpointing:
            for block in blocks:
                swap_class(block, CheckpointedBlock)
        return model

    dp_mesh, tp_mesh = mesh_dims(device_mesh)
    tp = tp_mesh.size() if tp_mesh is not None else 1
    dp = dp_mesh.size() if dp_mesh is not None else 1
    fsdp = dp_mesh is not None and (dp > 1 or tp == 1)
    if mixed_precision is not None and not fsdp:
        raise ValueError(
            f"mixed_precision={mixed_precision!r} is a policy of FSDP2, which tensor parallelism alone "
            f"(data_parallel_size=1) does not use: set trainer.precision=bf16-mixed instead"
        )
    check_tensor_parallel(model.config, list(widths), tp)
    device = _mesh_device(device_mesh)
    source = _rank0_weights(model)

    mixers = [block.mixer for block in blocks]
    tp_layouts: list[dict[str, Layout]] = [{} for _ in mixers]
    if tp > 1:
        tp_layouts = [shard_mixer(mixer, tp_mesh) for mixer in mixers]
    else:
        for mixer in mixers:
            swap_class(mixer, ShardedMixer)
    if activation_checkpointing:
        for block in blocks:
            swap_class(block, CheckpointedBlock)
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(
            param_dtype=MIXED_PRECISION.get(mixed_precision),
            reduce_dtype=torch.float32 if mixed_precision else None,
        )
        for block in blocks:
            fully_shard(block, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
        fully_shard(model, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)

    _materialize(model, device)
    stored = {
        f"{prefix}.{name}": lay
        for prefix, mixer_layouts in zip(_mixer_prefixes(model), tp_layouts)
        for name, lay in mixer_layouts.items()
    }
    _load_from_rank0(model, source, stored, device)
    for mixer, mixer_layouts in zip(mixers, tp_layouts):
        _register_layouts(mixer, mixer_layouts)
    return model


def _mixer_prefixes(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, MatMambaMixer)]


def _register_layouts(mixer: MatMambaMixer, tp_layouts: dict[str, Layout]) -> None:
    """Checkpoint hooks for a sharded mixer's model state: mamba-ssm's layout (`layout.py`)."""
    mamba = mamba_layouts(mixer)
    by_owner: dict[str, dict[str, Layout]] = {}
    for name in sorted(set(mamba) | set(tp_layouts)):
        if name in tp_layouts:
            lay = mamba[name].then(tp_layouts[name]) if name in mamba else tp_layouts[name]
        else:
            lay = mamba[name]
        owner, _, pname = name.rpartition(".")
        by_owner.setdefault(owner, {})[pname] = lay
    for owner_name, layouts in by_owner.items():
        owner = mixer.get_submodule(owner_name) if owner_name else mixer
        layouts = {pname: lay for pname, lay in layouts.items() if owner._parameters.get(pname) is not None}
        if layouts:
            layout.register(owner, layouts)


def register_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Keep the optimizer state of `model`'s tensor-parallel parameters in the layout a one-process
    optimizer holds (the mixer's internal one) in the optimizer's state dicts; nothing to do for
    other models."""
    layouts = {}
    for mixer in model.modules():
        if isinstance(mixer, TensorParallelMixer):
            for name, lay in tensor_parallel_layouts(mixer, mixer.tp_size).items():
                owner, _, pname = name.rpartition(".")
                param = (mixer.get_submodule(owner) if owner else mixer)._parameters.get(pname)
                if param is not None:
                    layouts[param] = lay
    layout.register_optimizer(optimizer, layouts)


def resolve_mesh_sizes(strategy: Any, world_size: int) -> None:
    """Fill in an "auto" size of a ModelParallelStrategy from the other one, and check that the mesh
    covers the world, with an error naming the fix (before any process starts).

    Lightning reads "auto" as data_parallel_size = number of nodes and tensor_parallel_size =
    devices per node, which is right when both are "auto" (FSDP across nodes, tensor parallelism
    within one). With one size given, the other is what makes the product the world size, so that
    `tensor_parallel_size: 1` is FSDP over every device and `data_parallel_size: 1` tensor
    parallelism over every device, whatever their number."""
    dp, tp = strategy._data_parallel_size, strategy._tensor_parallel_size
    if dp == "auto" and tp != "auto" and world_size % tp == 0:
        dp = world_size // tp
    elif tp == "auto" and dp != "auto" and world_size % dp == 0:
        tp = world_size // dp
    if (dp, tp) != ("auto", "auto") and ("auto" in (dp, tp) or dp * tp != world_size):
        raise ValueError(
            f"ModelParallelStrategy's mesh of data_parallel_size={dp} x tensor_parallel_size={tp} does "
            f"not fit the {world_size} processes (trainer.devices x trainer.num_nodes): choose sizes "
            f"whose product is {world_size}, or leave one of them 'auto' to follow the other"
        )
    strategy._data_parallel_size, strategy._tensor_parallel_size = dp, tp


def model_class(model: nn.Module) -> type:
    """The model's own class: `fully_shard` gives the modules it shards a class of its own on top."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(model)
    while issubclass(cls, FSDPModule) and cls is not FSDPModule:
        cls = next(base for base in cls.__bases__ if base is not FSDPModule)
    return cls


# Weights from rank 0 -----------------------------------------------------------------------------


def _rank0_weights(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Rank 0's parameters and buffers by name (internal layout, not copied); None on other ranks.
    A model on the meta device on rank 0 too is first built afresh there (a new random
    initialisation, with a warning)."""
    if dist.get_rank() != 0:
        return None
    if any(t.is_meta for t in chain(model.parameters(), model.buffers())):
        warnings.warn(
            "the model is on the meta device on rank 0 too: it is initialised afresh on rank 0 and "
            "broadcast. Build it on rank 0 normally (main.py does) for the same initial weights as "
            "training on one process",
            stacklevel=3,
        )
        with torch.device("cpu"):
            model = model._new_like(model.config)
        for m in model.modules():  # a head deep-copied from the meta model
            if any(t.is_meta for t in chain(m.parameters(recurse=False), m.buffers(recurse=False))):
                if not callable(getattr(m, "reset_parameters", None)):
                    raise ValueError(f"{type(m).__name__} on the meta device has no reset_parameters()")
                m.to_empty(device="cpu", recurse=False)
                m.reset_parameters()
    named = chain(model.named_parameters(), model.named_buffers())
    return {name: t.detach() for name, t in named}


def _materialize(model: nn.Module, device: torch.device) -> None:
    """Give parameters on the meta device (uninitialised) memory, keeping tied ones tied."""
    if not any(t.is_meta for t in chain(model.parameters(), model.buffers())):
        return
    tied: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(name)
    model.to_empty(device=device)  # a new tensor per module that holds a parameter
    for names in tied.values():
        first = model.get_parameter(names[0])
        for name in names[1:]:
            owner, _, pname = name.rpartition(".")
            model.get_submodule(owner).register_parameter(pname, first)


@torch.no_grad()
def _load_from_rank0(
    model: nn.Module, source: dict[str, torch.Tensor] | None, stored: dict[str, Layout], device: torch.device
) -> None:
    """Broadcast each of rank 0's tensors (one at a time) and keep this rank's block of it."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    tensors = dict(chain(model.named_parameters(), model.named_buffers()))
    names = [list(tensors)]
    dist.broadcast_object_list(names, src=0)
    if names[0] != list(tensors):
        raise RuntimeError(
            f"rank {dist.get_rank()}'s model has other parameters than rank 0's: every rank must build "
            f"the same model (names differ: {sorted(set(names[0]) ^ set(tensors))[:5]})"
        )
    for name, t in tensors.items():
        if source is not None:
            full = source[name].to(device=device, dtype=t.dtype).contiguous()
        else:
            full = torch.empty(t.shape, dtype=t.dtype, device=device)
        dist.broadcast(full, src=0)
        lay = stored.get(name)
        if lay is not None and lay.index is not None:
            full = full.index_select(lay.dim, lay.index.to(device))
        if isinstance(t, DTensor):
            t.to_local().copy_(
                distribute_tensor(full, t.device_mesh, t.placements, src_data_rank=None).to_local()
            )
        else:
            t.copy_(full)


# Activation checkpointing ------------------------------------------------------------------------


class CheckpointedBlock(Block):
    """A block whose activations are recomputed in the backward (training forwards only)."""

    def forward(self, hidden, residual, width, state=None):
        if state is not None or not torch.is_grad_enabled():
            return super().forward(hidden, residual, width, state)
        return torch.utils.checkpoint.checkpoint(
            super().forward, hidden, residual, width, use_reentrant=False
        )


# Batches under tensor parallelism ----------------------------------------------------------------


def broadcast_batch(batch: Any, tp_mesh: Any) -> Any:
    """The batch of the tensor-parallel group's first rank, on every rank of the group: tensor
    parallelism needs the same input on all of them, whatever the data loaders gave each."""
    group = tp_mesh.get_group()
    src = dist.get_global_rank(group, 0)
    leaves, spec = tree_flatten(batch)
    info = [[(tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else t for t in leaves]]
    dist.broadcast_object_list(info, src=src, group=group)
    own = dist.get_rank() == src
    out = []
    for leaf, item in zip(leaves, info[0]):
        if isinstance(leaf, torch.Tensor):
            shape, dtype = item
            t = leaf.contiguous() if own else torch.empty(shape, dtype=dtype, device=leaf.device)
            dist.broadcast(t, src=src, group=group)
            out.append(t)
        else:
            out.append(item)
    return tree_unflatten(out, spec)
