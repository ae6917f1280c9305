"""Parameter and FLOP counts of a sub-model, for budgets, Mix'n'Match curves and MFU.

Counted:
- parameters used at a width: every parameter a forward at that width reads (tied weights once);
- matmul parameters: in_proj rows and out_proj columns in use, plus the head (LM head or
  classifier) and the vision patch embedding; embeddings lookups, norms and the conv are not matmuls;
- SSD FLOPs of the chunked scan per token and layer, forward:
  2*Q*N*G (C.B^T inside a chunk) + 2*Q*k*P (scores @ x) + 4*k*P*N (chunk states in and out),
  with Q = chunk size (or the sequence length if shorter), k heads, P headdim, N d_state, G groups;
  the causal mask is not discounted.
Training FLOPs per token = 6 x matmul parameters + 3 x SSD FLOPs; inference = 2 x + 1 x.
"""

from __future__ import annotations

from torch import nn

from .mixer import MatMambaMixer

# The functions take any MatMamba model (a `NestedModel`: `config`, `backbone.layers[i].mixer`, and
# `lm_head` or `head`); they do not import it, so that the model can import them.


def _mixer_params(mixer: MatMambaMixer, width: int) -> tuple[int, int]:
    """(all parameters, matmul parameters) the mixer reads at `width`."""
    cfg = mixer.config
    k = cfg.heads(width)
    P, D = cfg.headdim, cfg.d_model
    rows = mixer.d_bc + k * P + k * (P + 1)
    conv_ch = mixer.d_bc + k * P
    in_proj = rows * D + (rows if mixer.in_proj.bias is not None else 0)
    out_proj = k * P * D + (D if mixer.out_proj.bias is not None else 0)
    conv = conv_ch * cfg.d_conv + (conv_ch if mixer.conv1d.bias is not None else 0)
    matmul = rows * D + k * P * D
    return in_proj + out_proj + conv + 3 * k + k * P, matmul


def _head_matmul_params(model: nn.Module) -> int:
    head = getattr(model, "lm_head", None) or getattr(model, "head", None)
    extra = model.patch_embed.weight.numel() if hasattr(model, "patch_embed") else 0
    return extra + sum(p.numel() for m in head.modules() if isinstance(m, nn.Linear) for p in [m.weight])


def param_count(model: nn.Module, widths: list[int]) -> int:
    seen: set[int] = set()
    total = 0
    for name, p in model.named_parameters():  # named_parameters() yields a tied weight once
        if ".mixer." in name or id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return total + sum(_mixer_params(layer.mixer, w)[0] for layer, w in zip(model.backbone.layers, widths))


def matmul_params(model: nn.Module, widths: list[int]) -> int:
    mixers = sum(_mixer_params(layer.mixer, w)[1] for layer, w in zip(model.backbone.layers, widths))
    return mixers + _head_matmul_params(model)


def ssd_flops_per_token(model: nn.Module, widths: list[int], seq_len: int | None = None) -> float:
    cfg = model.config
    q = cfg.chunk_size if seq_len is None else min(cfg.chunk_size, seq_len)
    N, P, G = cfg.d_state, cfg.headdim, cfg.ngroups
    total = 0.0
    for w in widths:
        k = cfg.heads(w)
        total += 2 * q * N * G + 2 * q * k * P + 4 * k * P * N
    return total


def flops_per_token(
    model: nn.Module, widths: list[int], training: bool = True, seq_len: int | None = None
) -> float:
    mm = matmul_params(model, widths)
    ssd = ssd_flops_per_token(model, widths, seq_len)
    return (6 * mm + 3 * ssd) if training else (2 * mm + ssd)
