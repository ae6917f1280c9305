"""The SSD scan of Mamba2 at any nested width, alone or fused with the gated RMSNorm after it."""

from __future__ import annotations

import functools
import importlib.util
import warnings

import torch

from ..backend import use_triton
from ..gated_rmsnorm import gated_rmsnorm
from .layout import split_last, split_xbc
from .reference import ssd_ref, ssd_step_ref

__all__ = ["ssd_gated_rmsnorm", "ssd_scan", "ssd_ref", "ssd_step", "ssd_step_ref"]


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    initial_state: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """See `ssd_ref` for shapes. The GPU path is mamba-ssm's Triton SSD kernel."""
    if use_triton(backend, x) and (backend == "triton" or _mamba_ssm_installed()):
        from .kernel import ssd_triton

        return ssd_triton(x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, initial_state)
    return ssd_ref(x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, initial_state)


@functools.cache
def _mamba_ssm_installed() -> bool:
    """backend="auto" on CUDA without mamba-ssm falls back to the reference scan, once with a warning."""
    if importlib.util.find_spec("mamba_ssm") is not None:
        return True
    warnings.warn(
        "mamba-ssm is not installed: the SSD scan runs the PyTorch reference on the GPU (slow). "
        "Install it for the fast path (see README, GPU install).",
        stacklevel=3,
    )
    return False


def ssd_gated_rmsnorm(
    xbc: torch.Tensor,
    zdt: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor,
    dt_bias: torch.Tensor,
    norm_weight: torch.Tensor,
    ngroups: int,
    chunk_size: int,
    eps: float = 1e-5,
    norm_before_gate: bool = False,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The mixer between the conv and out_proj, from its inputs' layouts (`layout.py`):

        xbc (B, L, 2GN + kP) = [B | C | x], zdt (B, L, k, P + 1) = [z | dt] per head,
        A, D, dt_bias (k,), norm_weight (kP,), initial_state (B, k, P, N) or None
        -> gated_rmsnorm(ssd_scan(x, dt, A, B, C, D, dt_bias, softplus), z), norm groups of kP / G
           channels: (B, L, kP); with `return_final_state`, also the final SSD state (B, k, P, N)

    On CUDA with mamba-ssm, without an initial or final state (training, plain forwards): one
    autograd node (`fused.py`) whose gradients are written in the inputs' layouts. Otherwise
    `ssd_scan` then `gated_rmsnorm`, each on `backend`.
    """
    if initial_state is None and not return_final_state and use_triton(backend, xbc) and _fused_available():
        from .fused import ssd_gated_rmsnorm_triton

        return ssd_gated_rmsnorm_triton(
            xbc, zdt, A, D, dt_bias, norm_weight, ngroups, chunk_size, eps, norm_before_gate
        )
    k, P = zdt.shape[-2], zdt.shape[-1] - 1
    x, Bm, Cm = split_xbc(xbc, ngroups, k, P)
    z, dt = split_last(zdt, P)
    y, final_state = ssd_scan(
        x,
        dt,
        A,
        Bm,
        Cm,
        chunk_size,
        D=D,
        dt_bias=dt_bias,
        dt_softplus=True,
        initial_state=initial_state,
        backend=backend,
    )  # (B, L, k, P)
    y = gated_rmsnorm(
        y.flatten(-2),
        z.flatten(-2),
        norm_weight,
        eps,
        k * P // ngroups,
        norm_before_gate=norm_before_gate,
        backend=backend,
    )  # (B, L, kP)
    return (y, final_state) if return_final_state else y


@functools.cache
def _fused_available() -> bool:
    """mamba-ssm's private SSD steps import (see `mamba_ssm_compat.get_ssd_internals`)."""
    from ..mamba_ssm_compat import get_ssd_internals

    if not _mamba_ssm_installed():
        return False
    try:
        get_ssd_internals()
    except ImportError as e:
        warnings.warn(f"the fused SSD + norm path is off, using the separate ops: {e}", stacklevel=3)
        return False
    return True


def ssd_step(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    state: torch.Tensor,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One recurrent decoding step (see `ssd_step_ref` for shapes): y and the new state.

    The GPU path is mamba-ssm's Triton `selective_state_update` (what stock Mamba2 decodes with),
    one kernel that reads and writes the state once and updates `state` in place (the state
    returned is `state` itself); the reference returns a new tensor. Either way, use the state
    returned. A, dt, D and dt_bias are per head: the kernel reads them broadcast over the head dim
    (zero strides, its tied-head-dim path).
    """
    if use_triton(backend, x) and (backend == "triton" or _mamba_ssm_installed()):
        from ..mamba_ssm_compat import get_selective_state_update

        k, P, N = state.shape[1:]
        if dt_bias is None:  # the kernel's tied-head-dim path reads dt_bias's strides
            dt_bias = dt.new_zeros(k)
        y = get_selective_state_update()(
            state,
            x,
            dt.unsqueeze(-1).expand(-1, k, P),
            A[:, None, None].expand(k, P, N),
            B,
            C,
            D=None if D is None else D[:, None].expand(k, P),
            dt_bias=dt_bias[:, None].expand(k, P),
            dt_softplus=dt_softplus,
        )  # (b, k, P); state updated in place
        return y, state
    return ssd_step_ref(x, dt, A, B, C, state, D, dt_bias, dt_softplus)
