"""One config dataclass for every MatMamba model, with named presets."""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal


@dataclass
class MatMambaConfig:
    """Sizes and options of a MatMamba model (language or vision).

    A *width* is measured in units of `d_model`: the full mixer has inner width
    `expand * d_model`; the sub-model of width `m` uses the first `expand * m` inner channels,
    i.e. the first `expand * m / headdim` heads. The paper's granularities are D, D/2, D/4, D/8.
    """

    d_model: int = 768
    n_layer: int = 24
    # Language models.
    vocab_size: int = 50277
    pad_vocab_size_multiple: int = 16
    tie_embeddings: bool = True
    # Mamba2 mixer (MatMamba's defaults).
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    headdim: int | None = None  # None: d_model // 32, i.e. 64 heads at full width with expand 2.
    ngroups: int = 1
    chunk_size: int = 256
    conv_bias: bool = True
    proj_bias: bool = False
    norm_eps: float = 1e-5
    norm_before_gate: bool = False
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    A_init_range: tuple[float, float] = (1.0, 16.0)
    # Nested widths trained jointly; None: (D, D/2, D/4, D/8).
    granularities: tuple[int, ...] | None = None
    # Full width of each layer; None: d_model everywhere. `extract()` sets it for Mix'n'Match models.
    layer_widths: tuple[int, ...] | None = None
    # Which implementation runs the ops: "auto" (Triton kernels on CUDA, reference on CPU),
    # "reference" or "triton" (see lit_matmamba.kernels.backend).
    backend: str = "auto"
    # Vision models.
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    pool: Literal["token", "mean"] = "token"
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.headdim is None:
            if self.d_model % 32:
                raise ValueError(f"d_model={self.d_model} is not a multiple of 32; set headdim explicitly")
            self.headdim = self.d_model // 32
        self.A_init_range = tuple(self.A_init_range)
        if self.layer_widths is None:
            self.layer_widths = (self.d_model,) * self.n_layer
        self.layer_widths = tuple(int(w) for w in self.layer_widths)
        if len(self.layer_widths) != self.n_layer:
            raise ValueError(f"layer_widths has {len(self.layer_widths)} entries for n_layer={self.n_layer}")
        for i, w in enumerate(self.layer_widths):
            if w <= 0 or w > self.d_model or (self.expand * w) % self.headdim:
                raise ValueError(
                    f"layer_widths[{i}]={w} is not a whole number of heads of width "
                    f"{allowed_width_step(self)} up to d_model={self.d_model}"
                )
            if self.heads_at(w) % self.ngroups:
                raise ValueError(
                    f"layer_widths[{i}]={w} gives {self.heads_at(w)} heads, not a multiple of "
                    f"ngroups={self.ngroups}"
                )
        if self.granularities is None:
            self.granularities = tuple(
                self.d_model // f for f in (1, 2, 4, 8) if self.is_valid_width(self.d_model // f)
            )
        self.granularities = tuple(int(g) for g in self.granularities)

    # Derived sizes -------------------------------------------------------------------------
    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    def heads_at(self, width: int) -> int:
        return self.expand * width // self.headdim

    def is_valid_width(self, width: int, layer: int | None = None) -> bool:
        limit = self.d_model if layer is None else self.layer_widths[layer]
        return (
            isinstance(width, int)
            and not isinstance(width, bool)
            and 0 < width <= limit
            and (self.expand * width) % self.headdim == 0
            and self.heads_at(width) % self.ngroups == 0
        )

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    # Presets -------------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> MatMambaConfig:
        """A named preset (see `MatMambaConfig.presets()`), with fields overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @staticmethod
    def presets() -> list[str]:
        return sorted(PRESETS)

    def replace(self, **changes: Any) -> MatMambaConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Chunk 128 rather than Mamba2's 256 for the language models: the chunk size only sets how the
# scan is blocked (the function is the same), and the graphed joint step measured faster with 128
# on an H200 at both ends of the range, 130m and 1.4b (BENCHMARKS.md, fourth run). 370m and 790m
# follow them unmeasured.
_LM = dict(vocab_size=50277, chunk_size=128)
_VISION = dict(img_size=224, patch_size=16, num_classes=1000, drop_path_rate=0.1, drop_rate=0.1)

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's language models (FineWeb, GPT-NeoX tokenizer).
    "lm-130m": dict(d_model=768, n_layer=24, **_LM),
    "lm-370m": dict(d_model=1024, n_layer=48, **_LM),
    "lm-790m": dict(d_model=1536, n_layer=48, **_LM),
    "lm-1.4b": dict(d_model=2048, n_layer=48, **_LM),
    # The paper's vision models (ImageNet-1k).
    "vision-35m": dict(d_model=512, n_layer=20, **_VISION),
    "vision-135m": dict(d_model=1024, n_layer=20, **_VISION),
    # Tiny models for tests and CPU demos: headdim 8 keeps D/8 a whole number of heads.
    "lm-tiny": dict(d_model=64, n_layer=2, vocab_size=4096, d_state=16, headdim=8, chunk_size=32),
    "lm-demo": dict(d_model=128, n_layer=4, vocab_size=4096, d_state=32, headdim=16, chunk_size=64),
    "vision-tiny": dict(
        d_model=64,
        n_layer=2,
        d_state=16,
        headdim=8,
        chunk_size=32,
        img_size=32,
        patch_size=8,
        in_chans=3,
        num_classes=10,
    ),
    "vision-demo": dict(
        d_model=128,
        n_layer=4,
        d_state=32,
        headdim=16,
        chunk_size=32,
        img_size=28,
        patch_size=7,
        in_chans=3,
        num_classes=10,
        drop_path_rate=0.05,
    ),
}


def resolve_widths(config: MatMambaConfig, width: int | Sequence[int] | None) -> list[int]:
    """The width of every layer for `width`: None (each layer's full width), an int (all layers)
    or a sequence of one int per layer (Mix'n'Match). Raises ValueError naming the allowed widths."""
    n = config.n_layer
    if width is None:
        return list(config.layer_widths)
    if isinstance(width, int) and not isinstance(width, bool):
        widths = [width] * n
    elif isinstance(width, Sequence) and not isinstance(width, str):
        widths = list(width)
        if len(widths) != n:
            raise ValueError(f"a per-layer width needs {n} entries (one per layer), got {len(widths)}")
    else:
        raise ValueError(f"width must be None, an int or a sequence of {n} ints, got {width!r}")
    for i, w in enumerate(widths):
        try:
            if isinstance(w, bool):
                raise TypeError
            w = widths[i] = operator.index(w)  # accepts numpy and 0-d tensor integers
        except TypeError:
            raise ValueError(f"widths must be whole numbers, got {w!r} for layer {i}") from None
        if not config.is_valid_width(w, i):
            raise ValueError(
                f"width {w!r} is not valid for layer {i}: allowed widths are multiples of "
                f"{allowed_width_step(config)} from {allowed_width_step(config)} to {config.layer_widths[i]} "
                f"(whole heads of headdim={config.headdim} at expand={config.expand}"
                + (f", in multiples of ngroups={config.ngroups} heads" if config.ngroups > 1 else "")
                + f"); the trained granularities are {list(config.granularities)}"
            )
    return widths


def allowed_width_step(config: MatMambaConfig) -> int:
    """Smallest valid width: the width of `ngroups` heads."""
    heads = config.ngroups
    # expand * width = heads * headdim  ->  width = heads * headdim / expand, rounded up to a whole
    # number of heads when expand does not divide headdim.
    while (heads * config.headdim) % config.expand:
        heads += config.ngroups
    return heads * config.headdim // config.expand


__all__ = ["MatMambaConfig", "PRESETS", "resolve_widths", "allowed_width_step"]
