"""What the deploy commands share: the width written on a command line, reading the model, the
device, and bad input reported in one line."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lit_matmamba.io import Pretrained, load
from lit_matmamba.models.config import MatMambaConfig, Width

# What a command line may give as a width (`parse_width`).
WidthArg = int | list[int] | str | None


def parse_width(value: WidthArg, config: MatMambaConfig) -> Width:
    """A width written on a command line, checked by `config.resolve` (which names the valid
    widths when it is not one). Accepted:

    - nothing (None): every layer at its full width;
    - an int: every layer at that width (in units of d_model, as everywhere in the package);
    - one int per layer: a list, or text with the ints separated by commas, colons or spaces
      (`64,32,32,16`; in lm-eval's `--model_args`, which splits on commas, `64:32:32:16`);
    - `D` or `D/k`: d_model // k for every layer (D/2, D/4 and D/8 are the paper's granularities);
    - the path of a JSON file written by `main.py search`: its chosen width.

    Returns an int for a uniform width, else one int per layer.
    """
    if isinstance(value, str):
        text = value.strip()
        if text.endswith(".json"):
            value = _width_from_search(Path(text))
        elif m := re.fullmatch(r"D(?:/(\d+))?", text):
            k = int(m.group(1) or 1)
            if k == 0 or config.d_model % k:
                raise ValueError(f"width {text}: d_model={config.d_model} is not divisible by {k}")
            value = config.d_model // k
        elif re.fullmatch(r"\d+", text):
            value = int(text)
        elif re.fullmatch(r"\d+([,: ]+\d+)+", text):
            value = [int(v) for v in re.split(r"[,: ]+", text)]
        else:
            raise ValueError(
                f"width {value!r}: give an int, one int per layer (64,32,32,16), D/k, or a search result JSON"
            )
    if value is None:
        return None
    config.resolve(value)
    if isinstance(value, Sequence) and len(set(value)) == 1:
        return int(value[0])
    return value if isinstance(value, int) else [int(v) for v in value]


def _width_from_search(path: Path) -> list[int]:
    try:
        return list(json.loads(path.read_text())["chosen"]["width"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path} is not a search result (no chosen width): {err}") from None


def describe(width: Width) -> str:
    """A width for messages and file names: `64` or `64-32-32-16`."""
    if width is None:
        return "full"
    return str(width) if isinstance(width, int) else "-".join(str(w) for w in width)


def pick_device(device: str | None) -> torch.device:
    """`device`, or (None or "auto") CUDA when there is a GPU, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def open_model(ckpt_path: str | None, model: str | None, device: torch.device) -> Pretrained:
    """The model named by `--ckpt_path` (a training checkpoint) or `--model` (a directory): one."""
    if (ckpt_path is None) == (model is None):
        raise ValueError("give either --ckpt_path (a training checkpoint) or --model (a model directory)")
    return load(ckpt_path if ckpt_path is not None else model, map_location=device)


def run(function: Callable[..., Any], argv: list[str], prog: str, description: str | None = None) -> None:
    """Run `function` as a jsonargparse command line (its docstring and type hints make
    `--help`). Bad input (a ValueError or an OSError such as a missing file) ends the command
    with one line on stderr and exit status 1, without a traceback."""
    from jsonargparse import CLI

    if description is None:  # the whole docstring before Args:, not only its first line
        description = (function.__doc__ or "").split("\n    Args:")[0].strip()
    try:
        CLI(function, args=argv, prog=prog, description=description, as_positional=False)
    except (ValueError, OSError) as err:
        raise SystemExit(f"{prog}: error: {err}") from None
