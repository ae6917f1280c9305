"""Tensor parallelism of the nested mixer, with every width spread evenly over the ranks.

The plan (Megatron-style, by heads):

- `in_proj` is column-parallel by heads: rank r computes the x, z and dt rows of its own heads, and
  a 1/tp slice of the B and C rows, which after the (depthwise, hence local) conv are all-gathered,
  so that every rank has the whole B and C its heads read (its backward sums the ranks' partial
  gradients: an all-reduce). The mixer's input gradient is all-reduced (`_CopyToTP`).
- conv1d, the SSD scan, dt_bias, A_log and D are local: every head is independent given B and C.
- The gated RMSNorm normalises over the whole inner width of the sub-model in use (per group of
  heads): each rank sums the squares of its channels and the sums are all-reduced, forward and
  backward, so the result is the unsharded norm's.
- `out_proj` is row-parallel: each rank multiplies its heads' columns, the partial outputs are
  all-reduced (`_ReduceFromTP`), the bias is added once.
- Everything outside the mixers (embedding, block norms, LM head, loss) is replicated: the LM head
  is tied to the embedding, and the loss is the project's fused cross-entropy, which takes whole
  rows of logits; a vocabulary-parallel head would need both split.

Head placement. A sub-model of width w uses the first `heads(w)` heads. With contiguous shards the
narrow widths would live on the first ranks only (at tp = 8 the D/8 sub-model on one rank, the
other seven idle). Here rank r holds heads r, r + tp, r + 2 tp, ... ("round-robin"), so a width of
k heads gives every rank k / tp of them: balanced at every granularity whenever tp divides k (and,
with ngroups > 1, k / ngroups, so that no group of heads straddles ranks unevenly). The heads a rank
holds are kept in increasing order, so each width is again a prefix of the rank's local block:
a forward at any width takes views of local weights, as on one process.

The rank's local block of every parameter is the internal layout of a mixer with its heads
(`models/mixer.py`), so the global tensor of a sharded parameter (a DTensor, `Shard(0)`, or
`Shard(1)` for out_proj's columns) is the ranks' blocks one after the other: a permutation of the
canonical tensor, which checkpoints hold (`layout.py`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lit_matmamba.kernels import causal_conv1d, ssd_scan
from lit_matmamba.kernels.ssd.layout import split_last, split_xbc
from lit_matmamba.models.config import MatMambaConfig, Width
from lit_matmamba.models.mixer import MatMambaMixer, mamba_to_internal_index
from lit_matmamba.models.nested_linear import nested_linear

from .layout import Layout

# Placement ---------------------------------------------------------------------------------------


def rank_heads(nheads: int, tp: int, rank: int) -> list[int]:
    """The heads (of a mixer with `nheads`) that tensor-parallel rank `rank` of `tp` holds, in order."""
    return list(range(rank, nheads, tp))


def heads_per_rank(config: MatMambaConfig, width: int, tp: int) -> list[int]:
    """How many of the heads a layer at `width` uses live on each of the `tp` ranks."""
    k = config.heads(width)
    return [len(range(r, k, tp)) for r in range(tp)]


def check_tensor_parallel(config: MatMambaConfig, widths: Sequence[Width], tp: int) -> None:
    """Raise a ValueError naming the fix when tensor parallelism of size `tp` cannot split every
    width in `widths` evenly (module docstring), or the B and C rows."""
    if tp == 1:
        return
    g = config.ngroups
    layer_widths = sorted({w for width in widths for w in config.resolve(width)} | set(config.layer_widths))
    # tp must divide every width's heads per group, and the B and C rows (2 ngroups d_state).
    common = math.gcd(2 * g * config.d_state, *(config.heads(w) // g for w in layer_widths))
    sizes = [t for t in range(1, common + 1) if common % t == 0]
    for w in layer_widths:
        k = config.heads(w)
        if k % (tp * g):
            raise ValueError(
                f"tensor_parallel_size={tp} cannot spread width {w} evenly over its ranks: it has {k} "
                + (f"heads in {g} groups" if g > 1 else "heads")
                + f". Use a tensor_parallel_size in {sizes}, or train and evaluate only widths with a "
                f"multiple of {tp * g} heads (model.init_args.granularities and eval_widths)"
            )
    if (2 * g * config.d_state) % tp:
        raise ValueError(
            f"tensor_parallel_size={tp} does not divide the {2 * g * config.d_state} B and C channels "
            f"(2 x ngroups x d_state): use a tensor_parallel_size in {sizes}"
        )


def tensor_parallel_layouts(mixer: MatMambaMixer, tp: int) -> dict[str, Layout]:
    """For each parameter of the mixer (`in_proj.weight`, ...): how the concatenated local blocks
    of the `tp` ranks permute its internal layout (the stored layout of the sharded parameter)."""
    H, P, d_bc = mixer.nheads, mixer.config.headdim, mixer.d_bc
    c = d_bc // tp
    heads = [torch.tensor(rank_heads(H, tp, r), dtype=torch.long) for r in range(tp)]

    def rows(hs: torch.Tensor, size: int) -> torch.Tensor:  # the `size` rows of each head in hs
        return (hs[:, None] * size + torch.arange(size)).flatten()

    bc = [torch.arange(r * c, (r + 1) * c) for r in range(tp)]
    in_proj = torch.cat(
        [
            torch.cat([bc[r], d_bc + rows(heads[r], P), d_bc + H * P + rows(heads[r], P + 1)])
            for r in range(tp)
        ]
    )
    conv = torch.cat([torch.cat([bc[r], d_bc + rows(heads[r], P)]) for r in range(tp)])
    per_head = torch.cat(heads)
    channels = torch.cat([rows(heads[r], P) for r in range(tp)])
    return {
        "in_proj.weight": Layout(0, in_proj),
        "in_proj.bias": Layout(0, in_proj),
        "conv1d.weight": Layout(0, conv),
        "conv1d.bias": Layout(0, conv),
        "dt_bias": Layout(0, per_head),
        "A_log": Layout(0, per_head),
        "D": Layout(0, per_head),
        "norm.weight": Layout(0, channels),
        "out_proj.weight": Layout(1, channels),
    }


def mamba_layouts(mixer: MatMambaMixer) -> dict[str, Layout]:
    """The mixer's internal layout relative to mamba-ssm's (its state dict's), per parameter."""
    in_proj, conv = mamba_to_internal_index(mixer)
    return {
        "in_proj.weight": Layout(0, in_proj),
        "in_proj.bias": Layout(0, in_proj),
        "conv1d.weight": Layout(0, conv),
        "conv1d.bias": Layout(0, conv),
    }


# Collectives with their gradients ----------------------------------------------------------------


class _CopyToTP(torch.autograd.Function):
    """Identity forward; the gradient, partial on each rank (its heads'), is all-reduced."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce (sum) forward; what follows is replicated, so the gradient passes as it is."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _AllReduceSum(torch.autograd.Function):
    """All-reduce (sum) forward and backward: the sum feeds sharded computations on every rank,
    so its gradient is the sum of the ranks' partial gradients."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _GatherLast(torch.autograd.Function):
    """All-gather along the last dimension, in rank order; the gradient of the whole is partial on
    each rank, so it is summed over the ranks (an all-reduce; gloo has no reduce-scatter) and each
    rank keeps its own slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.size = group, x.shape[-1]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        rank = dist.get_rank(ctx.group)
        return grad[..., rank * ctx.size : (rank + 1) * ctx.size], None


def gated_rmsnorm_sharded(
    x: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    ngroups: int,
    group_size: int,
    norm_before_gate: bool,
    group: dist.ProcessGroup,
) -> torch.Tensor:
    """`gated_rmsnorm_ref` over channels split across the ranks of `group`: x, z (..., C_local),
    weight (C_local,), `ngroups` norm groups of `group_size` channels in all (each rank holding the
    same share of every group). The sums of squares are all-reduced, so the result is the
    unsharded norm's. Computed in float32 (or wider), returned in x's dtype."""
    dtype = x.dtype
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    zf = z.to(xf.dtype)
    if not norm_before_gate:
        xf = xf * F.silu(zf)
    xg = xf.unflatten(-1, (ngroups, -1))  # (..., G, C_local / G)
    squares = _AllReduceSum.apply(xg.pow(2).sum(-1, keepdim=True), group)  # (..., G, 1)
    out = (xg * torch.rsqrt(squares / group_size + eps)).flatten(-2) * weight.to(xf.dtype)
    if norm_before_gate:
        out = out * F.silu(zf)
    return out.to(dtype)


# The mixer ---------------------------------------------------------------------------------------


def _local(t: torch.Tensor | None) -> torch.Tensor | None:
    """The rank's block of a sharded parameter (a view whose gradient flows to the DTensor)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


class TensorParallelMixer(MatMambaMixer):
    """A `MatMambaMixer` whose heads are dealt out over a tensor-parallel group (module docstring).

    Made by `shard_mixer` from a mixer (its class is swapped, as `fully_shard` does): sizes such as
    `nheads` and `d_bc` stay the whole mixer's (parameter and FLOP counts read them), parameters are
    DTensors whose local blocks the forward uses. Training and evaluation only: decoding and
    `extract` run on one process, on the model `load_model` rebuilds from a checkpoint.
    """

    tp_group: dist.ProcessGroup
    tp_size: int

    def forward(self, u: torch.Tensor, width: int, state: Any = None) -> torch.Tensor:
        """u: (B, L, d_model), the same on every rank of the group -> (B, L, d_model), likewise."""
        if state is not None:
            raise NotImplementedError(
                "decoding with a recurrent state is not tensor-parallel: load the model on one "
                "process (lit_matmamba.training.load_model) to generate"
            )
        cfg, tp, group = self.config, self.tp_size, self.tp_group
        P, G = cfg.headdim, cfg.ngroups
        heads = cfg.heads(width)
        if heads % (tp * G):
            raise ValueError(f"width {width} ({heads} heads) cannot be split over {tp} ranks evenly")
        k, bc = heads // tp, self.d_bc // tp  # this rank's heads at `width`, B and C rows
        zdt_offset = bc + self.nheads // tp * P  # first (z, dt) row of the local block
        conv_w, conv_b = _local(self.conv1d.weight), _local(self.conv1d.bias)
        c = bc + k * P

        u = _CopyToTP.apply(u, group)
        xbc, zdt = nested_linear(
            u,
            _local(self.in_proj.weight),
            _local(self.in_proj.bias),
            rows=(slice(0, c), slice(zdt_offset, zdt_offset + k * (P + 1))),
        )  # (B, L, bc + kP), (B, L, k(P+1))
        xbc, _ = causal_conv1d(
            xbc,
            conv_w[:c, 0],
            None if conv_b is None else conv_b[:c],
            None,
            activation=True,
            backend=cfg.backend,
        )
        bc_part, x = xbc.split([bc, k * P], dim=-1)
        xbc = torch.cat([_GatherLast.apply(bc_part, group), x], dim=-1)  # (B, L, 2GN + kP)
        x, Bm, Cm = split_xbc(xbc, G, k, P)
        z, dt = split_last(zdt.unflatten(-1, (k, P + 1)), P)
        A_log = _local(self.A_log)[:k]
        y, _ = ssd_scan(
            x,
            dt,
            -torch.exp(A_log.to(torch.promote_types(A_log.dtype, torch.float32))),
            Bm,
            Cm,
            cfg.chunk_size,
            D=_local(self.D)[:k],
            dt_bias=_local(self.dt_bias)[:k],
            dt_softplus=True,
            backend=cfg.backend,
        )  # (B, L, k, P)
        y = gated_rmsnorm_sharded(
            y.flatten(-2),
            z.flatten(-2),
            _local(self.norm.weight)[: k * P],
            cfg.norm_eps,
            G,
            heads * P // G,
            cfg.norm_before_gate,
            group,
        )  # (B, L, kP)
        out = _ReduceFromTP.apply(nested_linear(y, _local(self.out_proj.weight), None, cols=k * P), group)
        return out if self.out_proj.bias is None else out + _local(self.out_proj.bias)

    def step(self, u: torch.Tensor, width: int, state: Any) -> torch.Tensor:
        return self.forward(u, width, state)

    # Checkpoints: the conversion happens in per-parameter hooks (layout.py), which also undo the
    # sharding; the mixer's own mamba-ssm conversion would see DTensors.
    def state_dict_to_mamba(self, state_dict: dict, prefix: str) -> None:
        pass

    def state_dict_from_mamba(self, state_dict: dict, prefix: str) -> None:
        pass


class ShardedMixer(MatMambaMixer):
    """A mixer whose parameters FSDP2 shards (forward unchanged): checkpoints are converted by the
    per-parameter hooks of `layout.py`, which gather the shards."""

    def state_dict_to_mamba(self, state_dict: dict, prefix: str) -> None:
        pass

    def state_dict_from_mamba(self, state_dict: dict, prefix: str) -> None:
        pass


_SWAPPED: dict[tuple[type, type], type] = {}


def swap_class(module: nn.Module, mixin: type) -> None:
    """Give `module` the class `mixin` on top of its own (as `fully_shard` does), cached per class.
    `mixin` subclasses the module's base class (MatMambaMixer, Block); a subclass of that keeps its
    own methods under the mixin's."""
    cls = type(module)
    if issubclass(cls, mixin):
        return
    if issubclass(mixin, cls):
        module.__class__ = mixin
        return
    if (mixin, cls) not in _SWAPPED:
        _SWAPPED[mixin, cls] = type(f"{mixin.__name__}{cls.__name__}", (mixin, cls), {})
    module.__class__ = _SWAPPED[mixin, cls]


def shard_mixer(mixer: MatMambaMixer, tp_mesh: Any) -> dict[str, Layout]:
    """Deal the mixer's heads out over the ranks of the 1-D mesh `tp_mesh` (module docstring):
    every parameter becomes a DTensor holding this rank's block (out_proj's bias, which is not
    split, a replica: all the mixer's parameters are DTensors, all the others' plain tensors, so
    that each optimizer group of `optim.param_groups` holds one kind). Returns the stored layout of
    each parameter relative to the internal one."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    tp, rank = tp_mesh.size(), tp_mesh.get_local_rank()
    layouts = tensor_parallel_layouts(mixer, tp)
    for name, layout in layouts.items():
        owner_name, _, pname = name.rpartition(".")
        owner = mixer.get_submodule(owner_name) if owner_name else mixer
        p = owner._parameters.get(pname)
        if p is None:
            continue
        n = layout.index.numel() // tp
        local = p.detach().index_select(layout.dim, layout.index[rank * n : (rank + 1) * n].to(p.device))
        local = local.to(_mesh_device(tp_mesh)) if not local.is_meta else local
        sharded = nn.Parameter(
            DTensor.from_local(local, tp_mesh, [Shard(layout.dim)], run_check=False),
            requires_grad=p.requires_grad,
        )
        if getattr(p, "_no_weight_decay", False):
            sharded._no_weight_decay = True
        owner._parameters[pname] = sharded
    if mixer.out_proj.bias is not None:  # added once, after the all-reduce: a replica per rank
        bias = mixer.out_proj.bias
        local = bias.detach().to(_mesh_device(tp_mesh)) if not bias.is_meta else bias.detach()
        mixer.out_proj.bias = nn.Parameter(
            DTensor.from_local(local, tp_mesh, [Replicate()], run_check=False),
            requires_grad=bias.requires_grad,
        )
    swap_class(mixer, TensorParallelMixer)
    mixer.tp_group, mixer.tp_size = tp_mesh.get_group(), tp
    return layouts


def _mesh_device(mesh: Any) -> torch.device:
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(mesh.device_type, torch.get_device_module(mesh.device_type).current_device())
