"""The residual stack shared by the language and vision models, and the width-aware base class."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .config import MatMambaConfig, resolve_widths
from .mixer import MatMambaMixer, MixerState

Width = int | Sequence[int] | None


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch of a sample with probability p."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), named as in mamba-ssm (`norm`, `mixer`)."""

    def __init__(self, config: MatMambaConfig, layer: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.mixer = MatMambaMixer(config, config.layer_widths[layer])
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor, width: int, state: MixerState | None = None) -> torch.Tensor:
        return x + drop_path(self.mixer(self.norm(x), width, state), self.drop_path, self.training)

    def step(self, x: torch.Tensor, width: int, state: MixerState) -> torch.Tensor:
        return x + self.mixer.step(self.norm(x), width, state)


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

    def forward(
        self, h: torch.Tensor, widths: list[int], cache: InferenceCache | None = None
    ) -> torch.Tensor:
        """h: (B, L, d_model) -> (B, L, d_model), layer i at widths[i]."""
        for i, layer in enumerate(self.layers):
            h = layer(h, widths[i], None if cache is None else cache.states[i])
        return self.norm_f(h)

    def step(self, h: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            h = layer.step(h, cache.widths[i], cache.states[i])
        return self.norm_f(h)


class NestedModel(nn.Module):
    """What every MatMamba model shares: width resolution, caches, counts, extraction."""

    config: MatMambaConfig
    backbone: MatMambaStack

    def widths(self, width: Width) -> list[int]:
        """Per-layer widths for `width` (None, an int, or one int per layer); ValueError if invalid."""
        return resolve_widths(self.config, width)

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
    ) -> InferenceCache:
        widths = self.widths(width)
        states = [
            layer.mixer.allocate_state(batch_size, w, dtype, device)
            for layer, w in zip(self.backbone.layers, widths)
        ]
        return InferenceCache(widths, states)

    def _check_cache(self, cache: InferenceCache, width: Width) -> list[int]:
        widths = self.widths(width) if width is not None else cache.widths
        if widths != cache.widths:
            raise ValueError(f"the cache was allocated for widths {cache.widths}, not {widths}")
        return widths

    def extract(self, width: Width) -> NestedModel:
        """A standalone, physically smaller model of the same class that computes what this one
        computes at `width` (Mix'n'Match widths give a model with a different width per layer)."""
        widths = self.widths(width)
        smallest = min(widths)
        grans = tuple(g for g in self.config.granularities if g <= smallest) or (smallest,)
        config = self.config.replace(layer_widths=tuple(widths), granularities=grans)
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

    # Counts ----------------------------------------------------------------------------------
    def num_params(self, width: Width = None) -> int:
        """Parameters the sub-model of `width` uses (what `extract(width)` would hold)."""
        from .flops import param_count

        return param_count(self, self.widths(width))

    def flops_per_token(
        self, width: Width = None, training: bool = True, seq_len: int | None = None
    ) -> float:
        """Model FLOPs per token: 2 (6 when training) x matmul parameters used at `width`
        (head included) plus the SSD scan (x3 when training). See `lit_matmamba.models.flops`."""
        from .flops import flops_per_token

        return flops_per_token(self, self.widths(width), training=training, seq_len=seq_len)
