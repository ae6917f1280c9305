"""``python main.py prepare``: turn raw text or image folders into the shards the data modules read.

::

    python main.py prepare text --output_dir DIR --tokenizer tokenizer.json --train 'texts/*.txt' ...
    python main.py prepare images pack --src DIR --output_dir DIR ...
    python main.py prepare images verify --location DIR ...
    python main.py prepare images fashion-mnist ...

Each command is a function of this package, and its options and ``--help`` come from that function's
signature and docstring (jsonargparse, as in the rest of the command line), so the two cannot drift
apart. Bad input ends the command with one line that says what is wrong, not a traceback.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Callable
from typing import Any

from jsonargparse import ArgumentParser, DefaultHelpFormatter

from lit_matmamba.data import prepare_text as prepare_text_module
from lit_matmamba.data.fashion_mnist import ensure_fashion_mnist
from lit_matmamba.data.prepare_images import load_index, prepare_images, verify_shards
from lit_matmamba.data.prepare_text import prepare_text

# Errors of bad input (missing files, wrong formats, an output that exists, a failed download):
# their messages say what to do, where a traceback would only hide it.
INPUT_ERRORS = (OSError, ValueError, ImportError, RuntimeError)


class _HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Keeps the line breaks of the descriptions, which hold file layouts and examples."""


def _print_text_summary(index: dict[str, Any]) -> None:
    for split, entry in index["splits"].items():
        print(
            f"{split}: {entry['sequences']} sequences of {index['seq_len']} tokens in {len(entry['shards'])} "
            f"shard(s), {entry['text_bytes']} bytes of text from {entry['documents']} documents"
        )


def _print_image_summary(location: Any, index: dict[str, Any]) -> None:
    print(f"{location}: {len(index['class_names'])} classes")
    for split, entry in index["splits"].items():
        skipped = f", {len(entry['skipped'])} skipped" if entry["skipped"] else ""
        print(f"  {split}: {entry['num_samples']} samples in {len(entry['shards'])} shards{skipped}")


def _text(**kwargs: Any) -> None:
    _print_text_summary(prepare_text(**kwargs))


def _pack(**kwargs: Any) -> None:
    _print_image_summary(kwargs["output_dir"], prepare_images(**kwargs))


def _verify(**kwargs: Any) -> None:
    _print_image_summary(kwargs["location"], verify_shards(**kwargs))


def _fashion_mnist(**kwargs: Any) -> None:
    folder = ensure_fashion_mnist(**kwargs)
    _print_image_summary(folder, load_index(folder)[0])


# Each command: the function whose signature and docstring make its options, and what runs it.
IMAGE_COMMANDS = {
    "pack": (prepare_images, _pack),
    "verify": (verify_shards, _verify),
    "fashion-mnist": (ensure_fashion_mnist, _fashion_mnist),
}
RUNS = {("text",): _text, **{("images", name): run for name, (_, run) in IMAGE_COMMANDS.items()}}


def _description(function: Callable[..., Any]) -> str:
    """The docstring of ``function`` without its Args/Returns sections, which become the options' help."""
    doc = inspect.cleandoc(function.__doc__ or "")
    for section in ("\n\nArgs:", "\n\nReturns:", "\n\nRaises:"):
        doc = doc.split(section)[0]
    return doc


def _command(function: Callable[..., Any], description: str | None = None) -> ArgumentParser:
    parser = ArgumentParser(description=description or _description(function), formatter_class=_HelpFormatter)
    parser.add_function_arguments(function, as_group=False)
    return parser


def _summary(function: Callable[..., Any]) -> str:
    return _description(function).split("\n\n")[0].replace("\n", " ")


def build_parser(prog: str = "python main.py prepare") -> ArgumentParser:
    """The parser of ``prepare``: subcommands ``text`` and ``images {pack,verify,fashion-mnist}``."""
    parser = ArgumentParser(
        prog=prog,
        description="Turn raw text or image folders into the WebDataset shards the data modules read.",
        formatter_class=_HelpFormatter,
    )
    commands = parser.add_subcommands(required=True, dest="subcommand")
    # The file layout, from the module docstring, is what a user of the shards needs to know.
    module_doc = prepare_text_module.__doc__
    layout = module_doc[module_doc.index("Output directory layout") :].strip()
    text = _command(prepare_text, f"{_description(prepare_text)}\n\n{layout}")
    commands.add_subcommand("text", text, help=_summary(prepare_text))
    images_help = "Image data: pack an image-folder tree into shards, check shards, build Fashion-MNIST."
    images = ArgumentParser(description=images_help, formatter_class=_HelpFormatter)
    # jsonargparse needs a level's subcommand added before the subcommands below it.
    commands.add_subcommand("images", images, help=images_help)
    image_commands = images.add_subcommands(required=True, dest="subcommand")
    for name, (function, _) in IMAGE_COMMANDS.items():
        image_commands.add_subcommand(name, _command(function), help=_summary(function))
    return parser


def main(argv: list[str], prog: str = "python main.py prepare") -> None:
    """Run ``prepare`` with the arguments after ``prepare`` (``python main.py prepare --help`` lists them).

    Args:
        argv: The arguments, e.g. ``["images", "pack", "--src", "tree", "--output_dir", "shards"]``.
        prog: The program name shown in usage and help.
    """
    config = build_parser(prog).parse_args(argv)
    path, node = [], config
    while "subcommand" in node:
        path.append(node.subcommand)
        node = node[node.subcommand]
    try:
        RUNS[tuple(path)](**node.as_dict())
    except INPUT_ERRORS as e:
        sys.exit(f"error: {e}")
