"""The command line: `python main.py <command> ...`, or `lit-matmamba <command> ...` once installed.

fit / validate / test / predict are LightningCLI subcommands: the model (a `NestedModule` subclass
with its injected backbone and head), the data module, optimizer, scheduler, trainer and callbacks
all come from YAML (`--config configs/<name>.yaml`) via `class_path` entries. The other commands
(`COMMANDS`) are jsonargparse command lines of their own, on the same argument style, each in
the module that does the work.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_only

from lit_matmamba.models.backbone import NestedModel
from lit_matmamba.training import NestedModule, parallel

# The commands beside the Trainer's: name -> (module with `main(argv, prog)`, one line of help).
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": (
        "lit_matmamba.data.prepare",
        "Turn raw text or image folders into the shards the data modules read.",
    ),
    "bench": ("lit_matmamba.bench", "GPU benchmarks: speed, decode, memory, profile, kernels, tune."),
    "plot": ("lit_matmamba.plots", "Draw per-granularity curves of a run from its TensorBoard events."),
    "export": (
        "lit_matmamba.deploy.export",
        "Write a standalone model of one width (mamba-ssm format if it can).",
    ),
    "generate": ("lit_matmamba.deploy.generate", "Generate text from a language model at any width."),
    "search": (
        "lit_matmamba.deploy.search",
        "Find per-layer widths with the best validation metric under a params/FLOPs/latency budget.",
    ),
    "lm_eval": (
        "lit_matmamba.deploy.harness",
        "lm-evaluation-harness with the model adapter `matmamba` registered (needs the eval extra).",
    ),
    "embed": ("lit_matmamba.embed", "Write a split's features (images: pooled; text: mean) at any width."),
    "retrieval": ("lit_matmamba.retrieval", "Nearest-neighbour top-1 and mAP@10, query x database width."),
    "serve": ("lit_matmamba.serve", "Serve every width of a language model over OpenAI's completions API."),
    "study": (
        "lit_matmamba.training.study",
        "The recipe study (STUDY.md): train an arm over seeds and test it; tabulate every arm.",
    ),
}

DESCRIPTION = """Train, evaluate and ship nested MatMamba models (one training run, a model for every width).

  python main.py fit --config configs/lm_demo.yaml          train (see configs/ for presets)
  python main.py validate --config configs/lm_demo.yaml --ckpt_path PATH
  python main.py prepare text --help                        raw text -> token shards
  python main.py bench speed --help                         GPU benchmarks
  python main.py search --ckpt_path PATH --budget params=1e6 best widths under a budget
  python main.py export --ckpt_path PATH --width 64 --output DIR
  python main.py generate --ckpt_path PATH --width 32 --prompt "To be"

Every command takes --help. A configuration error prints one line; --debug (first, before the
command: python main.py --debug fit ...) shows its traceback. The optimizer and LR schedule are
the model's (--model.init_args.optimizer, .scheduler).
"""


# A top-level --optimizer / --lr_scheduler (LightningCLI's own, turned off: it replaced the model's
# optimizer and dropped its schedule without a word), as a flag or a config key in a parse error.
TOP_LEVEL_OPTIMIZER = re.compile(r"(?:--|')(optimizer|lr_scheduler)\b")


class MatMambaArgumentParser(LightningArgumentParser):
    """LightningCLI's parser; a parse error about a top-level optimizer or LR scheduler says where
    they go instead."""

    def error(self, message: str, ex: Exception | None = None) -> Any:
        if TOP_LEVEL_OPTIMIZER.search(message):
            message += (
                "\n  The optimizer and LR schedule are the model's: give them as "
                "--model.init_args.optimizer and --model.init_args.scheduler (in YAML: model.init_args."
                "optimizer / .scheduler), e.g. --model.init_args.optimizer=torch.optim.SGD "
                "--model.init_args.optimizer.lr=0.1; the top-level --optimizer/--lr_scheduler do not exist"
            )
        return super().error(message, ex)


_debug = False  # `main.py --debug`: configuration errors with their tracebacks


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """A configuration error (ValueError, TypeError, OSError) as its one message, `error: ...` and
    exit status 1, instead of a traceback through jsonargparse; `main.py --debug` shows it."""
    try:
        yield
    except (ValueError, TypeError, OSError) as err:
        if _debug:
            raise
        while err.__cause__ is not None:  # jsonargparse wraps the constructor's error
            err = err.__cause__
        raise SystemExit(f"error: {err}") from None


def check_ckpt_path(ckpt_path: str | None) -> None:
    """Refuse a --ckpt_path that is not a training checkpoint of this project before Lightning
    opens it (`lit_matmamba.io.read_checkpoint` says what it is instead)."""
    if not ckpt_path or ckpt_path in ("last", "best", "hpc") or str(ckpt_path).startswith("registry"):
        return
    from lit_matmamba.io import read_checkpoint

    read_checkpoint(ckpt_path, mmap=True)


class MatMambaCLI(LightningCLI):
    """LightningCLI that also lists the commands of `COMMANDS` in `--help` (they run before it),
    and hands a custom head's class path and arguments from the config to the module
    (`NestedModule.head_spec`), so that its checkpoints rebuild the head.

    Under ModelParallelStrategy (configs/strategy/), the model is built on the meta device on every
    rank but 0 (`parallel.parallelize` broadcasts rank 0's weights into every rank's shards), an
    "auto" size of the strategy's mesh follows from the other one (`parallel.resolve_mesh_sizes`),
    and a single-file `--ckpt_path` is read through a distributed copy
    (`parallel.to_distributed_checkpoint`).
    """

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if not _is_model_parallel(config.get("trainer.strategy")):
            return
        if rank_zero_only.rank != 0:
            self.parser.add_instantiator(_on_meta_device, NestedModel, subclasses=True)
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and os.path.isfile(ckpt_path) and rank_zero_only.rank == 0:
            # ModelParallelStrategy loads a single file one parameter at a time, which sharded
            # mixers cannot; the distributed copy loads whole. Every rank reads rank 0's path (the
            # strategy broadcasts it), so the copy goes beside the file, where every node of a
            # run sees it, or to the temporary folder where that folder is read-only.
            try:
                directory = tempfile.mkdtemp(
                    prefix=f".{os.path.basename(ckpt_path)}.distributed-",
                    dir=os.path.dirname(os.path.abspath(ckpt_path)),
                )
            except OSError:
                directory = tempfile.mkdtemp(prefix="lit-matmamba-ckpt-")
            atexit.register(shutil.rmtree, directory, ignore_errors=True)
            config["ckpt_path"] = str(parallel.to_distributed_checkpoint(ckpt_path, directory))

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--allow_data_mismatch",
            type=bool,
            default=False,
            help=(
                "Run although the data's tokenizer or shards differ from those --ckpt_path was trained "
                "on (their sha256 are recorded in the checkpoint; a mismatch is an error otherwise)."
            ),
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        if self.config.get("subcommand"):
            with user_errors():
                check_ckpt_path(self.config[self.config.subcommand].get("ckpt_path"))

    def instantiate_classes(self) -> None:
        with user_errors():
            super().instantiate_classes()

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        strategy = self.trainer.strategy
        if isinstance(strategy, ModelParallelStrategy):
            with user_errors():  # a mesh that does not fit: one line, before any process starts
                parallel.resolve_mesh_sizes(strategy, self.trainer.num_devices * self.trainer.num_nodes)
        config = self.config.get(str(self.subcommand), self.config)
        if isinstance(self.model, NestedModule):
            self.model.allow_data_mismatch = bool(config.get("allow_data_mismatch"))
        head = config.get("model.init_args.model.init_args.head")
        if head is not None and isinstance(self.model, NestedModule):
            spec = head.as_dict() if hasattr(head, "as_dict") else dict(head)
            self.model.head_spec = json.loads(json.dumps(spec, default=str))

    def _add_subcommands(self, parser: Any, **kwargs: Any) -> None:
        super()._add_subcommands(parser, **kwargs)
        from jsonargparse import ArgumentParser

        subcommands = parser._subcommands_action
        for name, (_, help_line) in COMMANDS.items():
            subcommands.add_subcommand(name, ArgumentParser(description=help_line), help=help_line)


def main(args: list[str] | None = None, run: bool = True) -> MatMambaCLI | None:
    """Run a command; with `run` False, only build the trainer, model and data module of `args`
    (LightningCLI's arguments without a subcommand) and return the CLI holding them."""
    # Our iterable datasets report exact lengths per rank and worker (see lit_matmamba.data), and the
    # LeafSpec notice is Lightning talking to itself: neither is something a user can act on.
    warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)")
    # Under several processes: the epoch metrics are torchmetrics, whose compute() already reduces
    # over the processes, and the throughput is counted over the replicas (callbacks.py); FSDP2
    # flags the first block's residual, which it returns as given (a view FSDP2's input hook
    # made), but nothing changes it in place (add_rmsnorm writes a new tensor).
    warnings.filterwarnings("ignore", message="It is recommended to use `self.log\\(.*sync_dist=True")
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPBlock\) returned a view tensor")
    global _debug
    argv = sys.argv[1:] if args is None else list(args)
    _debug = bool(argv) and argv[0] == "--debug"
    if _debug:
        argv = argv[1:]
    # argv is handed on as args; sys.argv then belongs to the caller.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    if run and argv and argv[0] in COMMANDS:
        module, _ = COMMANDS[argv[0]]
        prog = f"{_prog()} {argv[0]}"
        try:
            command = importlib.import_module(module)
        except ModuleNotFoundError as err:  # an optional extra that is not installed
            raise SystemExit(f"{prog}: {err}") from None
        command.main(argv[1:], prog=prog)
        return None
    return MatMambaCLI(
        NestedModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=argv,
        run=run,
        parser_class=MatMambaArgumentParser,
        auto_configure_optimizers=False,  # the model's own (see TOP_LEVEL_OPTIMIZER)
        parser_kwargs={
            "description": DESCRIPTION,
            "formatter_class": argparse.RawDescriptionHelpFormatter,
        },
        save_config_kwargs={"overwrite": True},
    )


def _is_model_parallel(strategy: Any) -> bool:
    """Whether a parsed `trainer.strategy` (a name, or a class_path with init_args) is a
    ModelParallelStrategy."""
    path = getattr(strategy, "class_path", None) or (
        strategy.get("class_path") if isinstance(strategy, dict) else None
    )
    if not path:
        return False
    module, _, name = path.rpartition(".")
    cls = getattr(importlib.import_module(module), name, None)
    return isinstance(cls, type) and issubclass(cls, ModelParallelStrategy)


def _on_meta_device(class_type: type, *args: Any, **kwargs: Any) -> Any:
    """A jsonargparse instantiator: the class built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        return class_type(*args, **kwargs)


def _prog() -> str:
    """How the user called us, for usage lines: `python main.py` or `lit-matmamba`."""
    name = sys.argv[0].rsplit("/", 1)[-1] if sys.argv and sys.argv[0] else "main.py"
    return f"python {name}" if name.endswith(".py") else name
