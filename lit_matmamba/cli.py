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
import importlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
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
}

DESCRIPTION = """Train, evaluate and ship nested MatMamba models (one training run, a model for every width).

  python main.py fit --config configs/lm_demo.yaml          train (see configs/ for presets)
  python main.py validate --config configs/lm_demo.yaml --ckpt_path PATH
  python main.py prepare text --help                        raw text -> token shards
  python main.py bench speed --help                         GPU benchmarks
  python main.py search --ckpt_path PATH --budget params=1e6 best widths under a budget
  python main.py export --ckpt_path PATH --width 64 --output DIR
  python main.py generate --ckpt_path PATH --width 32 --prompt "To be"

Every command takes --help.
"""


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

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        strategy = self.trainer.strategy
        if isinstance(strategy, ModelParallelStrategy):
            parallel.resolve_mesh_sizes(strategy, self.trainer.num_devices * self.trainer.num_nodes)
        config = self.config.get(str(self.subcommand), self.config)
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


def main(args: list[str] | None = None) -> MatMambaCLI | None:
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
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in COMMANDS:
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
        args=args,
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
