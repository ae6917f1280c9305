"""Pure-PyTorch state-space-duality (SSD) scan of Mamba2: the CPU path and the oracle for kernels.

The chunked algorithm of the Mamba2 paper (Dao & Gu 2024, section 6): inside a chunk of
`chunk_size` steps the scan is a masked (quadratic) matrix product; across chunks a recurrence
carries the (P, N) state of every head. Everything is computed in float32 or wider.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (..., T, T) with out[i, j] = a[j+1] + ... + a[i] for j <= i, -inf above.

    Summing masked copies instead of subtracting two cumsums keeps it exact for long chunks.
    """
    t = a.shape[-1]
    a = a.unsqueeze(-1).expand(*a.shape, t)  # (..., T, T): a[..., i, j] = a_i
    strict = torch.tril(torch.ones(t, t, dtype=torch.bool, device=a.device), diagonal=-1)
    a = a.masked_fill(~strict, 0)
    out = torch.cumsum(a, dim=-2)
    lower = torch.tril(torch.ones(t, t, dtype=torch.bool, device=a.device))
    return out.masked_fill(~lower, float("-inf"))


def _heads(t: torch.Tensor, nheads: int) -> torch.Tensor:
    """(b, l, g, n) -> (b, l, h, n): head i reads group i // (h / g), as in mamba-ssm."""
    return t.repeat_interleave(nheads // t.shape[2], dim=2)


def ssd_ref(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan, the signature of mamba-ssm's `mamba_chunk_scan_combined` (without z).

    Args:
        x: (b, l, h, p) inputs.
        dt: (b, l, h) raw time steps; softplus(dt + dt_bias) when `dt_softplus`.
        A: (h,) negative decay rates.
        B, C: (b, l, g, n) input and output projections, g divides h.
        chunk_size: steps per chunk; l need not be a multiple of it.
        D: (h,) skip connection or None.
        initial_state: (b, h, p, n) state before x[:, 0] or None (zeros).

    Returns:
        y: (b, l, h, p) in x's dtype.
        final_state: (b, h, p, n) in float32 (or float64 for float64 inputs).
    """
    bsz, seqlen, nheads, _ = x.shape
    cdtype = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(cdtype)
    dt = dt.to(cdtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(cdtype)
    if dt_softplus:
        dt = F.softplus(dt)
    Bh, Ch = _heads(B.to(cdtype), nheads), _heads(C.to(cdtype), nheads)  # (b, l, h, n)

    pad = (-seqlen) % chunk_size
    # Padded steps have dt = 0: no decay and no input, so the final state is unchanged.
    xdt = F.pad(xf * dt.unsqueeze(-1), (0, 0, 0, 0, 0, pad))  # (b, L, h, p)
    adt = F.pad(dt * A.to(cdtype), (0, 0, 0, pad))  # (b, L, h)
    Bh = F.pad(Bh, (0, 0, 0, 0, 0, pad))
    Ch = F.pad(Ch, (0, 0, 0, 0, 0, pad))
    nchunks = (seqlen + pad) // chunk_size

    def chunked(t: torch.Tensor) -> torch.Tensor:  # (b, L, ...) -> (b, c, q, ...)
        return t.unflatten(1, (nchunks, chunk_size))

    xdt, Bh, Ch = chunked(xdt), chunked(Bh), chunked(Ch)  # (b, c, q, h, p|n)
    adt = chunked(adt).permute(0, 3, 1, 2)  # (b, h, c, q)
    a_cum = torch.cumsum(adt, dim=-1)  # (b, h, c, q)

    # 1. Inside each chunk: y_diag[l] = sum_{s<=l} C_l.B_s exp(a_s+1..a_l) x_s dt_s.
    decay = torch.exp(_segsum(adt))  # (b, h, c, q, q)
    scores = torch.einsum("bclhn,bcshn->bhcls", Ch, Bh) * decay
    y = torch.einsum("bhcls,bcshp->bclhp", scores, xdt)

    # 2. The state each chunk adds, decayed to the chunk's end.
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (b, h, c, q)
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bh, decay_to_end, xdt)

    # 3. Recurrence across chunks: the state entering each chunk.
    state = x.new_zeros(bsz, nheads, x.shape[-1], Bh.shape[-1], dtype=cdtype)
    if initial_state is not None:
        state = initial_state.to(cdtype)
    chunk_decay = torch.exp(a_cum[..., -1])  # (b, h, c)
    entering = []
    for c in range(nchunks):
        entering.append(state)
        state = state * chunk_decay[:, :, c, None, None] + chunk_states[:, c]
    entering = torch.stack(entering, dim=1)  # (b, c, h, p, n)

    # 4. What the entering state contributes to each output.
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", Ch, entering, torch.exp(a_cum))
    y = y.flatten(1, 2)[:, :seqlen]  # (b, l, h, p)
    if D is not None:
        y = y + xf * D.to(cdtype).unsqueeze(-1)
    return y.to(x.dtype), state


def ssd_step_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    state: torch.Tensor,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One recurrent step. x: (b, h, p); dt: (b, h); B, C: (b, g, n); state: (b, h, p, n).

    Returns y (b, h, p) in x's dtype and the new state (in the state's dtype).
    """
    nheads = x.shape[1]
    cdtype = torch.promote_types(state.dtype, torch.float32)
    xf = x.to(cdtype)
    dt = dt.to(cdtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(cdtype)
    if dt_softplus:
        dt = F.softplus(dt)
    Bh = B.to(cdtype).repeat_interleave(nheads // B.shape[1], dim=1)  # (b, h, n)
    Ch = C.to(cdtype).repeat_interleave(nheads // C.shape[1], dim=1)
    decay = torch.exp(dt * A.to(cdtype))  # (b, h)
    new_state = state.to(cdtype) * decay[..., None, None] + (xf * dt.unsqueeze(-1)).unsqueeze(
        -1
    ) * Bh.unsqueeze(2)
    y = torch.einsum("bhpn,bhn->bhp", new_state, Ch)
    if D is not None:
        y = y + xf * D.to(cdtype).unsqueeze(-1)
    return y.to(x.dtype), new_state.to(state.dtype)
