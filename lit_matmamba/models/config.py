"""One config dataclass for every MatMamba model, its named presets, and the width vocabulary.

Glossary: one name for one idea, here and everywhere in the package.

- *width*: how wide a nested sub-model is, in units of `d_model`. A layer at width `m` uses the
  first `expand * m` inner channels of its mixer, that is the first `heads(m) = expand * m / headdim`
  heads. Width `d_model` is the full mixer; the paper's D/2 is width `d_model // 2`.
- `Width`: what a caller asks for. None (every layer at its full width), an int (every layer at
  that width) or a sequence of one int per layer (a *Mix'n'Match* width).
- *layer widths*: a `Width` resolved to one int per layer (`MatMambaConfig.resolve`). That is the
  one place where a width is checked; everything past it (blocks, mixers, kernels) trusts it. The
  config field `layer_widths` holds the full model's layer widths, what `resolve(None)` returns:
  `d_model` everywhere, except in a model `extract`ed at a Mix'n'Match width.
- *granularities*: the widths trained together, each on every batch (the paper's term). They are
  set in one place, the training module's `granularities` argument (default:
  `MatMambaConfig.default_granularities()`, the paper's D, D/2, D/4, D/8), and recorded in its
  checkpoints.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

Width = int | Sequence[int] | None


@dataclass
class MatMambaConfig:
    """Sizes and options of a MatMamba model (language or vision); widths as in the glossary above."""

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
    # The full model's layer widths; None: d_model everywhere (`extract` sets it for Mix'n'Match).
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
        given = self.layer_widths
        self.layer_widths = (self.d_model,) * self.n_layer  # resolve() checks `given` against these
        if given is not None:
            try:
                self.layer_widths = tuple(self.resolve(list(given)))
            except ValueError as err:
                raise ValueError(f"layer_widths: {err}") from None

    # Widths ----------------------------------------------------------------------------------
    def heads(self, width: int) -> int:
        """Heads of a mixer at `width` (a valid width; see `resolve`)."""
        return self.expand * width // self.headdim

    @property
    def width_step(self) -> int:
        """The smallest width, and the step between widths: the width of `ngroups` heads."""
        heads = self.ngroups
        # expand * width = heads * headdim, so width = heads * headdim / expand, in whole heads
        # (a multiple of ngroups) when expand does not divide headdim.
        while (heads * self.headdim) % self.expand:
            heads += self.ngroups
        return heads * self.headdim // self.expand

    def resolve(self, width: Width) -> list[int]:
        """The layer widths of `width`: None (each layer's full width), an int (every layer) or one
        int per layer (Mix'n'Match). The one place that checks a width: raises ValueError naming
        the allowed widths."""
        n = self.n_layer
        if width is None:
            return list(self.layer_widths)
        if isinstance(width, int) and not isinstance(width, bool):
            widths = [width] * n
        elif isinstance(width, Sequence) and not isinstance(width, str):
            widths = list(width)
            if len(widths) != n:
                raise ValueError(f"a per-layer width needs {n} entries (one per layer), got {len(widths)}")
        else:
            raise ValueError(f"width must be None, an int or a sequence of {n} ints, got {width!r}")
        step = self.width_step
        for i, w in enumerate(widths):
            try:
                if isinstance(w, bool):
                    raise TypeError
                w = widths[i] = operator.index(w)  # accepts numpy and 0-d tensor integers
            except TypeError:
                raise ValueError(f"widths must be whole numbers, got {w!r} for layer {i}") from None
            if not (0 < w <= self.layer_widths[i] and w % step == 0):
                raise ValueError(
                    f"width {w!r} is not valid for layer {i}: allowed widths are multiples of {step} "
                    f"from {step} to {self.layer_widths[i]} (whole heads of headdim={self.headdim} at "
                    f"expand={self.expand}"
                    + (f", in multiples of ngroups={self.ngroups} heads" if self.ngroups > 1 else "")
                    + ")"
                )
        return widths

    def default_granularities(self) -> tuple[int, ...]:
        """The paper's granularities D, D/2, D/4, D/8 (those that are valid widths of every layer),
        widest first."""
        out = []
        for f in (1, 2, 4, 8):
            w = min(self.layer_widths) // f
            if w > 0 and w % self.width_step == 0:
                out.append(w)
        return tuple(out)

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
# scan is blocked (the function is the same), and the graphed joint step is faster with 128 on an
# H200 at both ends of the range, 130m and 1.4b (`main.py bench speed --chunk_size`). 370m and
# 790m follow them unmeasured.
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


__all__ = ["MatMambaConfig", "PRESETS", "Width"]
