"""Views into the mixer's two projections, as the SSD core and the mixer read them.

xbc (..., 2GN + kP) = [B | C | x]      the conv output (conv input rows of in_proj)
zdt (..., k, P + 1) = [z | dt] per head  the other rows of in_proj
"""

from __future__ import annotations

import torch


def split_xbc(xbc: torch.Tensor, ngroups: int, nheads: int, headdim: int):
    """xbc (..., 2GN + kP) -> x (..., k, P), B and C (..., G, N): views."""
    k, P = nheads, headdim
    GN = (xbc.shape[-1] - k * P) // 2
    Bm, Cm, x = xbc.split([GN, GN, k * P], dim=-1)
    G, N = ngroups, GN // ngroups
    return x.unflatten(-1, (k, P)), Bm.unflatten(-1, (G, N)), Cm.unflatten(-1, (G, N))


def split_last(t: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(t[..., :n], t[..., n]) for t (..., n+1): views, whose backward writes both gradients into
    one new buffer. Autograd's own backward of the two views zero-fills a full-size gradient for
    each and adds them: three extra passes over the in_proj output per layer and width."""
    return _SplitLast.apply(t, n)


class _SplitLast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, n):
        ctx.shape, ctx.n = t.shape, n
        return t[..., :n], t[..., n]

    @staticmethod
    def backward(ctx, d_head, d_last):
        like = d_head if d_head is not None else d_last
        grad = like.new_empty(ctx.shape)  # (..., n+1)
        n = ctx.n
        for part, g in ((grad[..., :n], d_head), (grad[..., n], d_last)):
            if g is None:
                part.zero_()
            else:
                part.copy_(g)
        return grad, None
