"""The command line: `python main.py {fit,validate,test,predict,prepare} ...`.

fit/validate/test/predict are LightningCLI subcommands: the model (a `NestedModule` subclass with
its injected backbone and head), the data module, optimizer, scheduler, trainer and callbacks all
come from YAML (`--config configs/<name>.yaml`) via `class_path` entries. `prepare` turns raw
text or image folders into the shards the data modules read.
"""

from __future__ import annotations

import sys
import warnings

import lightning as L
from lightning.pytorch.cli import LightningCLI

from lit_matmamba.training import NestedModule

DESCRIPTION = """Train and evaluate nested MatMamba models (one training run, a model for every width).

  python main.py fit --config configs/lm_demo.yaml          train (see configs/ for presets)
  python main.py validate --config configs/lm_demo.yaml --ckpt_path PATH
  python main.py prepare text --help                        raw text -> token shards
  python main.py prepare images --help                      image folders -> image shards
"""


class MatMambaCLI(LightningCLI):
    pass


def prepare_main(argv: list[str]) -> None:
    usage = "usage: python main.py prepare {text,images} [--help] ..."
    if not argv or argv[0] in ("-h", "--help"):
        print(
            usage + "\n\n  text    tokenize .txt/.jsonl/.parquet into WebDataset token shards\n"
            "  images  pack an image-folder tree into WebDataset image shards"
        )
        return
    kind, rest = argv[0], argv[1:]
    if kind == "text":
        from lit_matmamba.data.prepare_text import cli

        cli(rest)
    elif kind == "images":
        from lit_matmamba.data.prepare_images import cli

        raise SystemExit(cli(rest, prog="python main.py prepare images"))
    else:
        raise SystemExit(f"unknown prepare target {kind!r}\n{usage}")


def main(args: list[str] | None = None) -> MatMambaCLI | None:
    # Our iterable datasets report exact lengths per rank and worker (see lit_matmamba.data), and the
    # LeafSpec notice is Lightning talking to itself: neither is something a user can act on.
    warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)")
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] == "prepare":
        prepare_main(argv[1:])
        return None
    return MatMambaCLI(
        NestedModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        parser_kwargs={
            "description": DESCRIPTION,
            "formatter_class": __import__("argparse").RawDescriptionHelpFormatter,
        },
        save_config_kwargs={"overwrite": True},
    )
