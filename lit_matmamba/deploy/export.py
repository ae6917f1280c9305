"""`main.py export`: a standalone model of one width, in a directory that loads with one call."""

from __future__ import annotations

import json

from lit_matmamba.io import META_FILE, load

from .common import WidthArg, describe, parse_width, run


def export(ckpt_path: str, output: str, width: WidthArg = None) -> None:
    """Write the sub-model of one width of a trained nested model as a standalone directory.

    A language model of one width with the default head is written as stock mamba-ssm reads it
    (`MambaLMHeadModel.from_pretrained(DIR)`: config.json + pytorch_model.bin), plus
    model.safetensors, tokenizer.json and matmamba.json; a Mix'n'Match width, a custom head or a
    vision model (with a timm-style config.json) in the project's own format. Every export loads
    back with `MatMambaLM.from_pretrained(DIR)` (or `MatMambaVision`, or
    `lit_matmamba.io.load_model(DIR)`) and computes what the nested model computes at that width.
    The directory is written under a temporary name and renamed: it exists complete or not at all.

    Args:
        ckpt_path: a training checkpoint (.ckpt), or a model directory (an export, or a stock
            mamba-ssm checkpoint).
        output: the directory to create; it must not exist.
        width: the width to export (default: the full model): an int (every layer), one int per
            layer ([64,32,32,16] or 64,32,32,16), D/k (d_model // k), or a `search` result JSON.
    """
    pretrained = load(ckpt_path)
    model = pretrained.model
    chosen = parse_width(width, model.config)
    path = pretrained.save(output, chosen)
    files = sorted(p.name for p in path.iterdir())
    meta = json.loads((path / META_FILE).read_text())
    print(
        f"wrote {path}: {type(model).__name__} at width {describe(chosen)}, "
        f"{model.num_params(chosen):,} parameters ({', '.join(files)})"
    )
    print(f"load it with lit_matmamba.{type(model).__name__}.from_pretrained({str(path)!r})")
    if "pytorch_model.bin" in files:
        expand = json.loads((path / "config.json").read_text())["ssm_cfg"]["expand"]
        note = (
            ""
            if isinstance(expand, int)
            else f" (expand={expand}: stock mamba-ssm 2.3.2 builds whole expands only)"
        )
        print(f"stock mamba-ssm reads it too: MambaLMHeadModel.from_pretrained({str(path)!r}){note}")
    if pretrained.is_language_model and meta["tokenizer"] is None:
        print("no tokenizer was recorded in the checkpoint: the directory has none")


def main(argv: list[str], prog: str = "python main.py export") -> None:
    run(export, argv, prog)
