"""The nested Mamba2 mixer: one set of weights, a sub-mixer for every width.

Internal parameter layout
-------------------------
A sub-mixer of `k` heads uses the first `k` heads of x, z, dt, A, D, dt_bias, the norm weight and
out_proj's input columns, and always all of B and C. To make every sub-mixer a *prefix* of each
parameter (so a forward at any width takes views, never copies of weight slices) the rows of
`in_proj.weight` are stored as

    [B (G*N) | C (G*N) | x (H*P) | z_0 dt_0 | z_1 dt_1 | ... | z_{H-1} dt_{H-1}]

and the channels of `conv1d` as [B | C | x]. A sub-mixer then runs two matmuls over row prefixes,
one for the conv input [B, C, x_:k] and one for [(z, dt)_:k], and the conv input comes out
contiguous, ready for the conv kernel.

mamba-ssm stores in_proj rows as [z | x | B | C | dt] and conv channels as [x | B | C]. The
state-dict hooks below convert on save and on load, so `state_dict()` and `load_state_dict()`
speak mamba-ssm's layout (names, shapes and row order) and stock Mamba2 checkpoints load as they
are. Parameters and optimizer state stay in the internal layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lit_matmamba.kernels import causal_conv1d, causal_conv1d_step, gated_rmsnorm, ssd_gated_rmsnorm, ssd_step
from lit_matmamba.kernels.ssd.layout import split_last, split_xbc

from .config import MatMambaConfig
from .nested_linear import nested_linear


@dataclass
class MixerState:
    """Recurrent state of one mixer, sized to the width in use."""

    conv: torch.Tensor  # (B, 2GN + kP, d_conv - 1): the last conv inputs
    ssm: torch.Tensor  # (B, k, P, N), float32


class GatedRMSNorm(nn.Module):
    """Holds the norm weight (mamba-ssm name `norm.weight`); the op is `kernels.gated_rmsnorm`."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class MatMambaMixer(nn.Module):
    """Mamba2 mixer whose sub-mixers of fewer heads share its weights.

    Args:
        config: model sizes; widths are in units of `config.d_model` (see `models/config.py`).
        width: the full width of this mixer (`config.layer_widths[i]`); d_model by default.

    `forward` and `step` take a layer width already checked by `MatMambaConfig.resolve` (the models
    resolve every `Width` once, before the first layer).
    """

    def __init__(self, config: MatMambaConfig, width: int | None = None) -> None:
        super().__init__()
        self.config = config
        width = config.d_model if width is None else width
        P, G, N = config.headdim, config.ngroups, config.d_state
        self.nheads = H = config.heads(width)
        self.d_bc = 2 * G * N
        self.conv_dim = self.d_bc + H * P
        self.zdt_offset = self.conv_dim  # first row of the (z, dt) head blocks in in_proj
        d_in_proj = self.conv_dim + H * (P + 1)

        self.in_proj = nn.Linear(config.d_model, d_in_proj, bias=config.proj_bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            config.d_conv,
            groups=self.conv_dim,
            bias=config.conv_bias,
            padding=config.d_conv - 1,
        )
        # dt initialised as in Mamba2: log-uniform in [dt_min, dt_max], stored as softplus^-1.
        dt = torch.exp(
            torch.rand(H) * (math.log(config.dt_max) - math.log(config.dt_min)) + math.log(config.dt_min)
        )
        dt = dt.clamp(min=config.dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(*config.A_init_range)))
        self.D = nn.Parameter(torch.ones(H))
        self.norm = GatedRMSNorm(H * P)
        self.out_proj = nn.Linear(H * P, config.d_model, bias=config.proj_bias)
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True

        # state_dict() and load_state_dict() speak mamba-ssm's layout. The hooks call the two
        # methods at the end of the class, which a sharded mixer (`lit_matmamba.training.parallel`)
        # overrides: its conversion also undoes the sharding.
        self._register_state_dict_hook(_to_mamba_layout)
        self._register_load_state_dict_pre_hook(_from_mamba_layout, with_module=True)

    # State and views at a width --------------------------------------------------------------
    def allocate_state(
        self,
        batch_size: int,
        width: int,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        ssm_dtype: torch.dtype | None = None,
    ) -> MixerState:
        """Zeros: the conv state in `dtype` (default: the weights'), the SSM state in `ssm_dtype`
        (default: float32, or the weights' dtype if wider)."""
        k = self.config.heads(width)
        P, N = self.config.headdim, self.config.d_state
        dtype = dtype or self.conv1d.weight.dtype
        ssm_dtype = ssm_dtype or torch.promote_types(self.conv1d.weight.dtype, torch.float32)
        device = device or self.conv1d.weight.device
        return MixerState(
            conv=torch.zeros(
                batch_size, self.d_bc + k * P, self.config.d_conv - 1, dtype=dtype, device=device
            ),
            ssm=torch.zeros(batch_size, k, P, N, dtype=ssm_dtype, device=device),
        )

    def _views(self, k: int) -> dict:
        """Prefix views of every parameter for a sub-mixer of k heads (no copies); the blocks of
        in_proj and out_proj as indices (`nested_linear` takes the whole weight)."""
        P = self.config.headdim
        c = self.d_bc + k * P
        return dict(
            xbc_rows=slice(0, c),  # in_proj rows of the conv input [B, C, x_:k]
            zdt_rows=slice(self.zdt_offset, self.zdt_offset + k * (P + 1)),  # rows of (z, dt)_:k
            out_cols=k * P,  # out_proj input columns
            conv_w=self.conv1d.weight[:c, 0],
            conv_b=None if self.conv1d.bias is None else self.conv1d.bias[:c],
            dt_bias=self.dt_bias[:k],
            A=-torch.exp(self.A_log[:k].to(torch.promote_types(self.A_log.dtype, torch.float32))),
            D=self.D[:k],
            norm_w=self.norm.weight[: k * P],
        )

    # Forward ---------------------------------------------------------------------------------
    # forward() and step() share the input projection; shapes below are for a sequence
    # (B, L, ...), a decoding step has no L. The views into xbc and zdt: kernels/ssd/layout.py.
    def _in_proj(self, u: torch.Tensor, v: dict, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """u -> xbc (B, L, 2GN + kP), zdt (B, L, k, P+1): two matmuls over row prefixes."""
        xbc, zdt = nested_linear(
            u, self.in_proj.weight, self.in_proj.bias, rows=(v["xbc_rows"], v["zdt_rows"])
        )
        return xbc, zdt.unflatten(-1, (k, self.config.headdim + 1))

    def forward(self, u: torch.Tensor, width: int, state: MixerState | None = None) -> torch.Tensor:
        """u: (B, L, d_model) -> (B, L, d_model) through the sub-mixer of `width`.

        With `state`, the sequence continues from it and the state is updated in place
        (prefill for decoding).
        """
        cfg, backend = self.config, self.config.backend
        k = cfg.heads(width)
        v = self._views(k)
        xbc, zdt = self._in_proj(u, v, k)
        conv_init = None if state is None else state.conv
        xbc, conv_final = causal_conv1d(
            xbc, v["conv_w"], v["conv_b"], conv_init, activation=True, backend=backend
        )
        y = ssd_gated_rmsnorm(
            xbc,
            zdt,
            v["A"],
            v["D"],
            v["dt_bias"],
            v["norm_w"],
            cfg.ngroups,
            cfg.chunk_size,
            cfg.norm_eps,
            cfg.norm_before_gate,
            initial_state=None if state is None else state.ssm,
            return_final_state=state is not None,
            backend=backend,
        )  # (B, L, kP), and the final SSD state with `state`
        if state is not None:
            y, ssm_final = y
            state.conv, state.ssm = conv_final.detach(), ssm_final.detach()
        return nested_linear(y, self.out_proj.weight, self.out_proj.bias, cols=v["out_cols"])

    def step(self, u: torch.Tensor, width: int, state: MixerState) -> torch.Tensor:
        """One decoding step. u: (B, d_model) -> (B, d_model); updates `state`: its tensors are
        replaced (reference ops) or written in place (GPU kernels), so read them after the call.

        On the GPU every op but the two projections is one kernel (conv step, mamba-ssm's state
        update, gated norm): decoding a small width is bound by launches, and a CUDA graph of the
        step (`lit_matmamba.graphs.GraphedDecoder`) replays fewer of them."""
        k = self.config.heads(width)
        if state.ssm.shape[1] != k:
            raise ValueError(f"the state holds {state.ssm.shape[1]} heads but width {width} uses {k}")
        cfg, backend = self.config, self.config.backend
        v = self._views(k)
        xbc, zdt = self._in_proj(u, v, k)
        xbc, state.conv = causal_conv1d_step(xbc, state.conv, v["conv_w"], v["conv_b"], backend=backend)
        x, Bm, Cm = split_xbc(xbc, cfg.ngroups, k, cfg.headdim)
        z, dt = split_last(zdt, cfg.headdim)
        y, state.ssm = ssd_step(
            x, dt, v["A"], Bm, Cm, state.ssm, D=v["D"], dt_bias=v["dt_bias"], backend=backend
        )  # (B, k, P)
        y = gated_rmsnorm(
            y.flatten(-2),
            z.flatten(-2),
            v["norm_w"],
            cfg.norm_eps,
            group_size=k * cfg.headdim // cfg.ngroups,
            norm_before_gate=cfg.norm_before_gate,
            backend=backend,
        )  # (B, kP)
        return nested_linear(y, self.out_proj.weight, self.out_proj.bias, cols=v["out_cols"])

    @torch.no_grad()
    def copy_from(self, other: MatMambaMixer) -> None:
        """Fill this (smaller or equal) mixer with the leading heads of `other`."""
        k = self.nheads
        v = other._views(k)
        P = self.config.headdim
        rows = (v["xbc_rows"], v["zdt_rows"])
        self.in_proj.weight.copy_(torch.cat([other.in_proj.weight[r] for r in rows]))
        if self.in_proj.bias is not None:
            self.in_proj.bias.copy_(torch.cat([other.in_proj.bias[r] for r in rows]))
        self.conv1d.weight.copy_(other.conv1d.weight[: self.conv_dim])
        if self.conv1d.bias is not None:
            self.conv1d.bias.copy_(v["conv_b"])
        self.dt_bias.copy_(v["dt_bias"])
        self.A_log.copy_(other.A_log[:k])
        self.D.copy_(v["D"])
        self.norm.weight.copy_(v["norm_w"])
        self.out_proj.weight.copy_(other.out_proj.weight[:, : k * P])
        if self.out_proj.bias is not None:
            self.out_proj.bias.copy_(other.out_proj.bias)

    # State-dict layout (module docstring) -----------------------------------------------------
    def state_dict_to_mamba(self, state_dict: dict, prefix: str) -> None:
        """Rewrite this mixer's entries of `state_dict` from the internal layout to mamba-ssm's."""
        for key, idx in _permuted_keys(self, prefix).items():
            if key in state_dict:
                t = state_dict[key]
                # mamba[idx] = internal
                state_dict[key] = torch.empty_like(t).index_copy_(0, idx.to(t.device), t)

    def state_dict_from_mamba(self, state_dict: dict, prefix: str) -> None:
        """Rewrite this mixer's entries of `state_dict` from mamba-ssm's layout to the internal one."""
        for key, idx in _permuted_keys(self, prefix).items():
            t = state_dict.get(key)
            # Tensors of the wrong size are left alone: load_state_dict then reports the mismatch.
            if t is not None and t.shape[0] == idx.numel():
                state_dict[key] = t.index_select(0, idx.to(t.device))


# Layout conversion to and from mamba-ssm ---------------------------------------------------------
def mamba_to_internal_index(mixer: MatMambaMixer) -> tuple[torch.Tensor, torch.Tensor]:
    """Index tensors `(in_proj_idx, conv_idx)` with internal = mamba[idx] along dim 0."""
    H, P, bc = mixer.nheads, mixer.config.headdim, mixer.d_bc
    hp = H * P
    # mamba-ssm in_proj rows: z [0, hp) | x [hp, 2hp) | B, C [2hp, 2hp+bc) | dt [2hp+bc, 2hp+bc+H)
    heads = [torch.cat([torch.arange(h * P, (h + 1) * P), torch.tensor([2 * hp + bc + h])]) for h in range(H)]
    in_proj = torch.cat([torch.arange(2 * hp, 2 * hp + bc), torch.arange(hp, 2 * hp), *heads])
    # mamba-ssm conv channels: x [0, hp) | B, C [hp, hp+bc)
    conv = torch.cat([torch.arange(hp, hp + bc), torch.arange(hp)])
    return in_proj, conv


def _permuted_keys(mixer: MatMambaMixer, prefix: str) -> dict[str, torch.Tensor]:
    in_proj, conv = mamba_to_internal_index(mixer)
    return {
        f"{prefix}in_proj.weight": in_proj,
        f"{prefix}in_proj.bias": in_proj,
        f"{prefix}conv1d.weight": conv,
        f"{prefix}conv1d.bias": conv,
    }


def _to_mamba_layout(mixer: MatMambaMixer, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    mixer.state_dict_to_mamba(state_dict, prefix)


def _from_mamba_layout(mixer: MatMambaMixer, state_dict: dict, prefix: str, *args) -> None:
    mixer.state_dict_from_mamba(state_dict, prefix)
