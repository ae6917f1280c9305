"""Everything distributed in one place: gradient reduction, sharding, checkpoints of sharded models.

- `grads.py`: gradients reduced once per optimizer step (`gradient_sync`), clipped by their global
  norm across shards (`clip_grad_norm`), and when direct weight gradients must stay off
  (`is_distributed`).
- `parallelize.py`: `parallelize(model, device_mesh, ...)`, the one entry point that shards a model
  (tensor parallelism, activation checkpointing, FSDP2), applied from `configure_model()`.
- `tensor_parallel.py`: the tensor-parallel mixer and its head placement (every width balanced
  over the ranks).
- `layout.py`: checkpoints keep the canonical layout whatever the sharding.
- `checkpoint.py`: checkpoint files across strategies (a distributed checkpoint read on one process,
  a single file as a distributed checkpoint, optimizer state keyed by name).

The model (`lit_matmamba.models`) imports nothing from here nor from `torch.distributed`.
"""

from .checkpoint import key_optimizer_states_by_name, load_full_checkpoint, to_distributed_checkpoint
from .grads import clip_grad_norm, gradient_sync, is_distributed
from .parallelize import (
    broadcast_batch,
    mesh_dims,
    model_class,
    parallelize,
    register_optimizer,
    resolve_mesh_sizes,
)
from .tensor_parallel import check_tensor_parallel, heads_per_rank, rank_heads

__all__ = [
    "broadcast_batch",
    "check_tensor_parallel",
    "clip_grad_norm",
    "gradient_sync",
    "heads_per_rank",
    "is_distributed",
    "key_optimizer_states_by_name",
    "load_full_checkpoint",
    "mesh_dims",
    "model_class",
    "parallelize",
    "rank_heads",
    "register_optimizer",
    "resolve_mesh_sizes",
    "to_distributed_checkpoint",
]
