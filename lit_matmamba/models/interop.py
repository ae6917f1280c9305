"""Checkpoints in mamba-ssm's format: load stock Mamba2 LMs, export uniform-width sub-models.

mamba-ssm's `MambaLMHeadModel.from_pretrained(dir)` reads `config.json` (a `MambaConfig`) and
`pytorch_model.bin` (its state dict) from a directory; `save_pretrained` writes the same two
files. Our `MatMambaLM.state_dict()` already uses mamba-ssm's names, shapes and row order (see
`mixer.py`), so these functions only translate the config and pick the sub-model.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from .config import MatMambaConfig, Width
from .lm import MatMambaLM

# Mamba2 layer defaults in mamba-ssm 2.x (mamba_ssm/modules/mamba2.py), used when ssm_cfg omits them.
_MAMBA2_DEFAULTS = dict(
    d_state=128,
    d_conv=4,
    expand=2,
    headdim=64,
    ngroups=1,
    chunk_size=256,
    conv_bias=True,
    bias=False,
    norm_before_gate=False,
    rmsnorm=True,
    D_has_hdim=False,
    A_init_range=(1, 16),
    dt_min=0.001,
    dt_max=0.1,
    dt_init_floor=1e-4,
)


def mamba_ssm_config(config: MatMambaConfig, width: int | None = None) -> dict[str, Any]:
    """The `MambaConfig` fields of the uniform sub-model of `width` (None: the model's own width)."""
    if len(set(config.layer_widths)) != 1:
        raise ValueError("mamba-ssm models have one inner width for every layer; this model's layers differ")
    width = config.layer_widths[0] if width is None else width
    config.resolve(width)  # raises ValueError naming the valid widths
    expand = config.expand * width / config.d_model
    # mamba-ssm 2.3.2 computes d_inner = (expand * d_model) // world_size: a float expand gives a
    # float size and the layer fails to build, so write whole numbers as ints.
    expand = int(expand) if expand.is_integer() else expand
    if int(expand * config.d_model) != config.expand * width:
        raise ValueError(f"width {width}: expand={expand} does not give a whole inner width in mamba-ssm")
    return dict(
        d_model=config.d_model,
        d_intermediate=0,
        n_layer=config.n_layer,
        vocab_size=config.vocab_size,
        ssm_cfg=dict(
            layer="Mamba2",
            d_state=config.d_state,
            d_conv=config.d_conv,
            expand=expand,
            headdim=config.headdim,
            ngroups=config.ngroups,
            chunk_size=config.chunk_size,
            conv_bias=config.conv_bias,
            bias=config.proj_bias,
            norm_before_gate=config.norm_before_gate,
            A_init_range=list(config.A_init_range),
            dt_min=config.dt_min,
            dt_max=config.dt_max,
            dt_init_floor=config.dt_init_floor,
        ),
        attn_layer_idx=[],
        attn_cfg={},
        rms_norm=True,
        residual_in_fp32=True,
        fused_add_norm=True,
        pad_vocab_size_multiple=config.pad_vocab_size_multiple,
        tie_embeddings=config.tie_embeddings,
    )


def config_from_mamba_ssm(cfg: dict[str, Any], **overrides: Any) -> MatMambaConfig:
    """A `MatMambaConfig` for a stock `MambaConfig` dict with Mamba2 layers and no MLP/attention."""
    ssm = {**_MAMBA2_DEFAULTS, **cfg.get("ssm_cfg", {})}
    problems = []
    if ssm.get("layer", "Mamba1") != "Mamba2":
        problems.append(f"ssm_cfg.layer={ssm.get('layer', 'Mamba1')!r} (only Mamba2 layers nest)")
    if cfg.get("d_intermediate", 0):
        problems.append("d_intermediate > 0 (MLP layers)")
    if cfg.get("attn_layer_idx"):
        problems.append("attention layers")
    if not cfg.get("rms_norm", True) or not ssm["rmsnorm"] or ssm["D_has_hdim"] or ssm.get("d_ssm"):
        problems.append("LayerNorm, D_has_hdim or d_ssm")
    if problems:
        raise ValueError("unsupported mamba-ssm checkpoint: " + "; ".join(problems))
    d_model = cfg["d_model"]
    d_inner = ssm["expand"] * d_model
    if d_inner != int(d_inner):
        raise ValueError(f"expand={ssm['expand']} does not give a whole inner width for d_model={d_model}")
    # A checkpoint exported at a sub-width has expand < 2 (or fractional): keep our expand an
    # integer and make every layer's full width smaller instead.
    expand = max(1, math.ceil(ssm["expand"]))
    width, rem = divmod(int(d_inner), expand)
    if rem:
        raise ValueError(f"expand={ssm['expand']}: inner width {int(d_inner)} is not a multiple of {expand}")
    layer_widths = (width,) * cfg["n_layer"] if width != d_model else None
    fields = dict(
        d_model=d_model,
        n_layer=cfg["n_layer"],
        vocab_size=cfg["vocab_size"],
        pad_vocab_size_multiple=cfg.get("pad_vocab_size_multiple", 8),
        tie_embeddings=cfg.get("tie_embeddings", True),
        d_state=ssm["d_state"],
        d_conv=ssm["d_conv"],
        expand=expand,
        layer_widths=layer_widths,
        headdim=ssm["headdim"],
        ngroups=ssm["ngroups"],
        chunk_size=ssm["chunk_size"],
        conv_bias=ssm["conv_bias"],
        proj_bias=ssm["bias"],
        norm_before_gate=ssm["norm_before_gate"],
        A_init_range=tuple(ssm["A_init_range"]),
        dt_min=ssm["dt_min"],
        dt_max=ssm["dt_max"],
        dt_init_floor=ssm["dt_init_floor"],
    )
    return MatMambaConfig(**{**fields, **overrides})


def load_mamba_ssm(path: str | os.PathLike, **overrides: Any) -> MatMambaLM:
    """A `MatMambaLM` from a mamba-ssm checkpoint directory (config.json + pytorch_model.bin),
    ready to become the starting point of nested training. `overrides` set config fields
    (e.g. `chunk_size`)."""
    path = Path(path)
    for name in ("config.json", "pytorch_model.bin"):
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"{path / name} not found: a mamba-ssm checkpoint directory holds "
                "config.json and pytorch_model.bin"
            )
    config = config_from_mamba_ssm(json.loads((path / "config.json").read_text()), **overrides)
    model = MatMambaLM(config)
    state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model


def write_mamba_ssm(model: MatMambaLM, directory: str | os.PathLike, width: int | None = None) -> None:
    """Write config.json and pytorch_model.bin of the uniform sub-model of `width` (None: the
    model itself) into the existing `directory`."""
    if width is not None and not isinstance(width, int):
        raise ValueError("mamba-ssm models have one inner width for every layer: pass an int width")
    cfg = mamba_ssm_config(model.config, width)
    sub = model.extract(width) if width is not None else model
    state = {k: v.detach().cpu().contiguous() for k, v in sub.state_dict().items()}
    (Path(directory) / "config.json").write_text(json.dumps(cfg, indent=2))
    torch.save(state, Path(directory) / "pytorch_model.bin")


def save_mamba_ssm(model: MatMambaLM, path: str | os.PathLike, width: Width = None) -> Path:
    """Write the uniform sub-model of `width` as a checkpoint stock `MambaLMHeadModel` loads
    (`MambaLMHeadModel.from_pretrained(path)`). Written to a temporary directory, then renamed."""
    if width is not None and not isinstance(width, int):
        raise ValueError("mamba-ssm models have one inner width for every layer: pass an int width")
    mamba_ssm_config(model.config, width)  # raises before anything is written
    from lit_matmamba.io import atomic_directory

    with atomic_directory(path) as tmp:
        write_mamba_ssm(model, tmp, width)
    return Path(path)
