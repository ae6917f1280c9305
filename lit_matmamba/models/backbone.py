"""The residual stack shared by the language and vision models, and the width-aware base class."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lit_matmamba.kernels import add_rmsnorm

from .config import MatMambaConfig, Width
from .flops import flops_per_token, param_count
from .mixer import MatMambaMixer, MixerState


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch of a sample with probability p."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


def add_norm(
    hidden: torch.Tensor | None, residual: torch.Tensor, norm: nn.RMSNorm, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual + hidden and its RMSNorm by `norm`'s weight and eps, in one op (`add_rmsnorm`).

    Returns (normed, residual). The sum is kept in float32; under autocast the normed output is
    written in the autocast dtype, which the next matmul would cast it to anyway.
    """
    device = residual.device.type
    out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    return add_rmsnorm(hidden, residual, norm.weight, norm.eps, out_dtype=out_dtype, backend=backend)


class Block(nn.Module):
    """Pre-norm residual block, x + mixer(norm(x)), named as in mamba-ssm (`norm`, `mixer`).

    As in mamba-ssm's fused blocks, the add is deferred to the next norm so that add and norm are
    one op: a block takes `hidden`, the previous block's branch output (None for the first block),
    and `residual`, the stream it is added to; it returns its own branch output and the stream
    with `hidden` added (float32). The stack's final norm adds the last branch.
    """

    def __init__(self, config: MatMambaConfig, layer: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.mixer = MatMambaMixer(config, config.layer_widths[layer])
        self.drop_path = drop_path
        self.backend = config.backend

    def forward(
        self,
        hidden: torch.Tensor | None,
        residual: torch.Tensor,
        width: int,
        state: MixerState | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden, residual: (B, L, d_model) -> (hidden, residual), the same shapes."""
        normed, residual = add_norm(hidden, residual, self.norm, self.backend)  # (B, L, D) each
        hidden = drop_path(self.mixer(normed, width, state), self.drop_path, self.training)
        return hidden, residual

    def step(
        self, hidden: torch.Tensor | None, residual: torch.Tensor, width: int, state: MixerState
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoding step: hidden, residual (B, d_model) -> (hidden, residual)."""
        normed, residual = add_norm(hidden, residual, self.norm, self.backend)  # (B, D) each
        return self.mixer.step(normed, width, state), residual


@dataclass
class InferenceCache:
    """Per-layer recurrent states for decoding, sized to the widths in use (not the full width)."""

    widths: list[int]
    states: list[MixerState]
    seqlen_offset: int = 0


class MatMambaStack(nn.Module):
    """`n_layer` blocks and the final norm (`layers`, `norm_f` as in mamba-ssm's backbone)."""

    def __init__(self, config: MatMambaConfig) -> None:
        super().__init__()
        rates = [config.drop_path_rate * i / max(config.n_layer - 1, 1) for i in range(config.n_layer)]
        self.layers = nn.ModuleList(Block(config, i, rates[i]) for i in range(config.n_layer))
        self.norm_f = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.backend = config.backend

    def forward(
        self, h: torch.Tensor, widths: list[int], cache: InferenceCache | None = None
    ) -> torch.Tensor:
        """h: embeddings (B, L, d_model) -> normed features (B, L, d_model), layer i at widths[i]."""
        hidden, residual = None, h
        for i, layer in enumerate(self.layers):
            hidden, residual = layer(hidden, residual, widths[i], None if cache is None else cache.states[i])
        return add_norm(hidden, residual, self.norm_f, self.backend)[0]

    def step(self, h: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
        """One decoding step: h (B, d_model) -> (B, d_model) at the cache's widths."""
        hidden, residual = None, h
        for i, layer in enumerate(self.layers):
            hidden, residual = layer.step(hidden, residual, cache.widths[i], cache.states[i])
        return add_norm(hidden, residual, self.norm_f, self.backend)[0]


class NestedModel(nn.Module):
    """What every MatMamba model shares: caches, counts, extraction. Every method taking a `Width`
    resolves it once with `self.config.resolve` (the glossary is in `models/config.py`)."""

    config: MatMambaConfig
    backbone: MatMambaStack

    def _init_weights(self) -> None:
        """mamba-ssm's initialisation: small embeddings, out_proj scaled down by sqrt(n_layer)."""
        for name, p in self.named_parameters():
            if name.endswith("out_proj.weight"):
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                with torch.no_grad():
                    p /= math.sqrt(self.config.n_layer)
            elif name.endswith(("in_proj.bias", "out_proj.bias")):
                nn.init.zeros_(p)

    def allocate_cache(
        self,
        batch_size: int,
        width: Width = None,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        ssm_dtype: torch.dtype | None = None,
    ) -> InferenceCache:
        """Zero states for `batch_size` rows at `width`: conv states in `dtype` (default: the
        weights'), SSM states in `ssm_dtype` (default: float32, or float64 for a float64 model;
        stock mamba-ssm keeps them in the weights' dtype)."""
        widths = self.config.resolve(width)
        states = [
            layer.mixer.allocate_state(batch_size, w, dtype, device, ssm_dtype)
            for layer, w in zip(self.backbone.layers, widths)
        ]
        return InferenceCache(widths, states)

    def _check_cache(self, cache: InferenceCache, width: Width) -> list[int]:
        widths = self.config.resolve(width) if width is not None else cache.widths
        if widths != cache.widths:
            raise ValueError(f"the cache was allocated for widths {cache.widths}, not {widths}")
        return widths

    def extract(self, width: Width) -> NestedModel:
        """A standalone, physically smaller model of the same class that computes what this one
        computes at `width` (Mix'n'Match widths give a model with a different width per layer)."""
        config = self.config.replace(layer_widths=tuple(self.config.resolve(width)))
        sub = self._new_like(config)
        sub.to(device=next(self.parameters()).device, dtype=next(self.parameters()).dtype)
        own = dict(self.named_parameters())
        with torch.no_grad():
            for name, p in sub.named_parameters():
                if ".mixer." not in name:
                    p.copy_(own[name])
            for mine, theirs in zip(sub.backbone.layers, self.backbone.layers):
                mine.mixer.copy_from(theirs.mixer)
        sub.train(self.training)
        return sub

    def _new_like(self, config: MatMambaConfig) -> NestedModel:
        raise NotImplementedError

    def custom_head(self) -> nn.Module | None:
        """The head when it is not the one this model builds by default, else None."""
        raise NotImplementedError

    # Files -----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, map_location: str | torch.device = "cpu", head: nn.Module | None = None
    ) -> NestedModel:
        """The model at `path`: a directory written by `save_pretrained` (or `main.py export`), a
        training checkpoint, or a stock mamba-ssm checkpoint directory (`lit_matmamba.io.load`)."""
        from lit_matmamba.io import load

        model = load(path, map_location, head).model
        if not isinstance(model, cls):
            raise ValueError(f"{path} holds a {type(model).__name__}, not a {cls.__name__}")
        return model

    def save_pretrained(self, path: str | os.PathLike, width: Width = None) -> Path:
        """Write the sub-model of `width` as a standalone directory that `from_pretrained` reads
        (and stock mamba-ssm too, for a language model of one width; see `lit_matmamba.io`)."""
        from lit_matmamba.io import Pretrained

        return Pretrained(self).save(path, width)

    # Counts ----------------------------------------------------------------------------------
    def num_params(self, width: Width = None) -> int:
        """Parameters the sub-model of `width` uses (what `extract(width)` would hold)."""
        return param_count(self, self.config.resolve(width))

    def flops_per_token(
        self, width: Width = None, training: bool = True, seq_len: int | None = None
    ) -> float:
        """Model FLOPs per token: 2 (6 when training) x matmul parameters used at `width`
        (head included) plus the SSD scan (x3 when training). See `lit_matmamba.models.flops`."""
        return flops_per_token(self, self.config.resolve(width), training=training, seq_len=seq_len)
