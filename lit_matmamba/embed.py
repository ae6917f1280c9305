"""Embeddings: a trained model's features at any width, for retrieval and other downstream use.

::

    python main.py embed --ckpt_path CKPT --width 16 --split val --output val_w16.pt

MatMamba's widths nest inside the mixers; every sub-model reads and writes the same residual stream
of ``d_model`` channels, so its features have ``d_model`` dimensions at every width, and training
all granularities against one head keeps them in one metric space (``lit_matmamba.retrieval``
measures how well).

Which feature:

- images: the pooled features, the head's input (``MatMambaVision.forward_features``: the class
  token at the end of the sequence, or the mean over tokens, as the config's ``pool`` says).
- text: the mean over positions of ``MatMambaLM.forward_features`` (``pool="mean"``, the
  default), or the last position's (``pool="last"``). Mean by default: each position's feature is
  trained to predict the next token and carries mostly what is near it, and the average over
  positions summarises the whole sequence; it is the usual embedding of a causal language model
  that was not tuned for embeddings. The last position is the only one that has seen every token
  (as the vision model's class token at the end), so it is there to compare.

The file (``torch.save``; ``torch.load(path)`` reads it) is a dict:

- ``embeddings``: float32 (N, d_model), the features as the model gives them (not normalised);
- ``ids``: int64 (N,), each sample's position in its split's stored order (image shards in index
  order or the sorted files of a folder; token sequences in shard order), row i is sample ids[i];
- ``labels``: int64 (N,), the class index of images; -1 for text (token shards have no labels);
- ``width``: the layer widths used (one int per layer); ``feature``: "pooled" (images), "mean" or
  "last" (text); ``split``, ``checkpoint``, ``model`` (class name), ``granularities`` (the
  checkpoint's trained widths), ``data`` (the data module's class and arguments).
"""

from __future__ import annotations

import importlib
import os
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lit_matmamba.deploy.common import pick_device
from lit_matmamba.io import from_checkpoint, read_checkpoint
from lit_matmamba.models.config import Width

Pool = Literal["mean", "last"]
# The data module each model class reads when its checkpoint records none.
DEFAULT_DATA = {
    "MatMambaVision": "lit_matmamba.data.vision.ImageDataModule",
    "MatMambaLM": "lit_matmamba.data.text.TextDataModule",
}


@dataclass
class CheckpointRecord:
    """What a checkpoint says beside the weights: the trained widths, the data it was trained on
    (None when trained without a data module), and its optimizer step."""

    granularities: list[int]
    data: dict[str, Any] | None
    global_step: int


def checkpoint_record(ckpt_path: str | os.PathLike) -> CheckpointRecord:
    """A checkpoint's record, read without loading its weights (`load` reads both at once).

    The granularities are the training module's (``ckpt["matmamba"]``); the data module's class and
    arguments are those Lightning records (``datamodule_hyper_parameters``; LightningCLI adds the
    class as ``_class_path``).
    """
    return _record(read_checkpoint(ckpt_path, mmap=True))


def _record(ckpt: dict[str, Any]) -> CheckpointRecord:
    data = ckpt.get("datamodule_hyper_parameters")
    return CheckpointRecord(
        granularities=list(ckpt["matmamba"]["granularities"]),
        data=dict(data) if data else None,
        global_step=int(ckpt.get("global_step", 0)),
    )


def load(ckpt_path: str | os.PathLike) -> tuple[nn.Module, CheckpointRecord]:
    """The model of a checkpoint in eval mode, and its record; a clear error for a missing file.
    The checkpoint is read once, for both."""
    if not Path(ckpt_path).exists():  # a file, or a distributed checkpoint's directory
        raise FileNotFoundError(f"checkpoint {ckpt_path} not found")
    ckpt = read_checkpoint(ckpt_path)
    return from_checkpoint(ckpt, str(ckpt_path)).model.eval(), _record(ckpt)


def width_label(width: Width) -> str:
    """How a width is named in tables and tags: "128", or "[64,32,16,16]" for Mix'n'Match."""
    if width is None or isinstance(width, int):
        return "full" if width is None else str(width)
    return "[" + ",".join(str(w) for w in width) + "]"


def data_module(
    model: nn.Module,
    record: CheckpointRecord,
    data_dir: str | None = None,
    data: dict[str, Any] | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
) -> Any:
    """The data module the model was trained with (the checkpoint's record), with ``data_dir``,
    ``batch_size``, ``num_workers`` and the arguments in ``data`` replaced. Without a record: the
    model kind's default data module (Fashion-MNIST or Shakespeare unless ``data_dir`` is given)."""
    recorded = dict(record.data or {})
    class_path = recorded.pop("_class_path", None) or DEFAULT_DATA.get(type(model).__name__)
    if class_path is None:
        raise ValueError(f"no data module known for a {type(model).__name__}: train it with one")
    args = {k: v for k, v in recorded.items() if not k.startswith("_")}
    if record.data is None:
        print(
            f"the checkpoint records no data module: using {class_path}'s defaults and the options given",
            file=sys.stderr,
        )
    overrides = dict(data or {})
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    if batch_size is not None:
        overrides["batch_size"] = batch_size
    if num_workers is not None:
        overrides["num_workers"] = num_workers
    module_name, _, cls_name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    if cls_name == "TextDataModule":
        # Stored order, read in the main process: the n-th sequence read is sequence n of the split.
        overrides.update(shuffle=False, num_workers=0)
    try:
        dm = cls(**{**args, **overrides})
    except TypeError as err:
        raise ValueError(f"data: {err}") from None
    dm.prepare_data()
    dm.setup()
    return dm


def _loader(dm: Any, split: str) -> Any:
    """The loader of ``split`` read for embedding: no augmentation, every sample once, in one process."""
    if hasattr(dm, "check_vocab"):
        return dm.dataloader(split, rank=0, world_size=1)
    return dm.dataloader(split, rank=0, world_size=1, mode="eval", with_ids=True)


def features(model: nn.Module, inputs: torch.Tensor, width: Width, pool: Pool = "mean") -> torch.Tensor:
    """The embedding of a batch at ``width``: images (B, C, H, W) -> pooled features (B, d_model);
    token ids (B, L) -> the mean (or last) over positions of the features, (B, d_model)."""
    out = model.forward_features(inputs, width)
    if out.ndim == 2:  # vision: already pooled
        return out
    return out.mean(dim=1) if pool == "mean" else out[:, -1]  # (B, d_model)


@dataclass
class Embeddings:
    """Features of one split at several widths: ``features[i]`` (N, d_model) at ``widths[i]``."""

    widths: list[Width]
    features: list[torch.Tensor]
    ids: torch.Tensor
    labels: torch.Tensor
    feature: str


@torch.inference_mode()
def embed_split(
    model: nn.Module,
    dm: Any,
    split: str,
    widths: Sequence[Width],
    pool: Pool = "mean",
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Embeddings:
    """Embed every sample of ``split`` at each width in ``widths`` (one pass over the data: each batch
    is read once and run at every width), rows ordered by id."""
    from tqdm import tqdm

    for w in widths:
        model.config.resolve(w)  # a width the model cannot express fails before the data is read
    model = model.to(device)
    loader = _loader(dm, split)
    text = hasattr(dm, "check_vocab")
    if text:
        dm.check_vocab(model.config.vocab_size)
    feats: list[list[torch.Tensor]] = [[] for _ in widths]
    ids, labels = [], []
    seen = 0
    for batch in tqdm(loader, total=len(loader), desc=f"embed {split}", unit="batch", disable=not progress):
        if text:
            inputs = batch  # (B, L) token ids; no labels
            batch_ids = torch.arange(seen, seen + len(batch))
            batch_labels = torch.full((len(batch),), -1)
        else:
            inputs, batch_labels, batch_ids = batch  # (B, C, H, W), (B,), (B,)
        seen += len(inputs)
        inputs = inputs.to(device, non_blocking=True)
        for out, w in zip(feats, widths):
            out.append(features(model, inputs, w, pool).float().cpu())  # (B, d_model)
        ids.append(batch_ids)
        labels.append(batch_labels)
    if not seen:
        raise ValueError(f"split {split!r} has no samples")
    ids_t = torch.cat(ids).long()
    order = torch.argsort(ids_t)
    return Embeddings(
        widths=list(widths),
        features=[torch.cat(f)[order] for f in feats],
        ids=ids_t[order],
        labels=torch.cat(labels).long()[order],
        feature=pool if text else "pooled",
    )


def check_output(output: str | os.PathLike, overwrite: bool) -> Path:
    """The output path, checked before any work: it may not exist unless ``overwrite``."""
    path = Path(output)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists: pass --overwrite true to replace it")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory: give a file name, e.g. {path / 'embeddings.pt'}")
    return path


def save_atomic(obj: Any, path: str | os.PathLike, write: Callable[[Any, Path], None] = torch.save) -> Path:
    """``write(obj, tmp)`` (default ``torch.save``) to a temporary file beside ``path``, renamed onto
    it when complete, so that ``path`` is either whole or untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        write(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_embeddings(path: str | os.PathLike) -> dict[str, Any]:
    """An embedding file written by ``embed``, checked (see the module docstring for its keys)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"embedding file {path} not found")
    try:
        emb = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for files that are not its own
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{path} is not an embedding file written by `embed` ({first_line})") from None
    if not isinstance(emb, dict) or not {"embeddings", "ids", "labels"} <= set(emb):
        raise ValueError(f"{path} is not an embedding file written by `embed` (no embeddings, ids, labels)")
    e = emb["embeddings"]
    if e.ndim != 2 or emb["ids"].shape != (len(e),) or emb["labels"].shape != (len(e),):
        raise ValueError(
            f"{path}: embeddings {tuple(e.shape)}, ids {tuple(emb['ids'].shape)} and labels "
            f"{tuple(emb['labels'].shape)} do not fit together: write it again with `embed`"
        )
    return emb


def embed(
    ckpt_path: str,
    output: str,
    width: int | list[int] | None = None,
    split: str = "val",
    pool: Pool = "mean",
    data_dir: str | None = None,
    data: dict[str, Any] | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> None:
    """Write the features of every sample of a split at one width (file format below).

    Images: the pooled features (the head's input). Text: the mean over positions of the LM's
    features, or the last position's (--pool last). The data are those the checkpoint was trained
    on, read without augmentation in stored order, unless given here.

    Args:
        ckpt_path: a checkpoint of this project's trainer (e.g. logs/vision_demo/version_0/checkpoints/last.ckpt).
        output: the file to write (torch.save), e.g. val_w16.pt; written whole or not at all.
        width: the sub-model: an int (every layer at that width), one int per layer (Mix'n'Match,
            e.g. [64,32,16,16]), or none for the full model.
        split: the data split to embed: train, val, test.
        pool: text only: mean over positions, or the last position.
        data_dir: the data to read; default: the checkpoint's (its training data module's data_dir).
        data: other arguments of the data module over the checkpoint's, e.g. '{seq_len: 256}'.
        batch_size: samples per batch; default the checkpoint's data module's.
        num_workers: data loader workers (images); default the checkpoint's data module's.
        device: auto (the GPU if there is one), cpu, cuda, cuda:1, ...
        overwrite: replace an existing output file.
        progress: show a progress bar.
    """
    path = check_output(output, overwrite)
    model, record = load(ckpt_path)
    try:
        layer_widths = model.config.resolve(width)
    except ValueError as err:
        raise ValueError(f"--width {width_label(width)}: {err}") from None
    dm = data_module(model, record, data_dir, data, batch_size, num_workers)
    emb = embed_split(model, dm, split, [width], pool, pick_device(device), progress)
    save_atomic(
        {
            "embeddings": emb.features[0],
            "ids": emb.ids,
            "labels": emb.labels,
            "width": layer_widths,
            "feature": emb.feature,
            "split": split,
            "checkpoint": str(ckpt_path),
            "model": type(model).__name__,
            "granularities": record.granularities,
            "data": {"class": f"{type(dm).__module__}.{type(dm).__name__}", **_plain(dm.hparams)},
        },
        path,
    )
    n, d = emb.features[0].shape
    print(
        f"wrote {path}: {n} embeddings of {d} dimensions ({emb.feature} features, width {width_label(width)})"
    )


def _plain(args: Any) -> dict[str, Any]:
    """A data module's arguments as plain values, which ``torch.load(weights_only=True)`` reads."""
    scalar = (str, int, float, bool, type(None))

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)) and all(isinstance(x, scalar) for x in v):
            return list(v)
        return v if isinstance(v, scalar) else repr(v)

    return {k: plain(v) for k, v in dict(args).items()}


def run_command(function: Callable[..., Any], argv: list[str], prog: str, more: str = "") -> None:
    """Run ``function`` as a command: its arguments become ``--snake_case`` options (required ones
    too, as ``--ckpt_path`` is elsewhere in the CLI) whose help comes from its docstring and type
    hints, with ``more`` after its description; bad input ends the command with one line, not a
    traceback."""
    import argparse
    import inspect

    from jsonargparse import ArgumentParser, DefaultHelpFormatter

    from lit_matmamba.data.prepare import INPUT_ERRORS

    class Formatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    description = inspect.cleandoc(function.__doc__ or "").split("\n\nArgs:")[0] + more
    parser = ArgumentParser(prog=prog, description=description, formatter_class=Formatter)
    parser.add_function_arguments(function, as_group=False)
    config = parser.parse_args(argv)
    try:
        function(**config.as_dict())
    except INPUT_ERRORS as e:
        sys.exit(f"error: {e}")


def main(argv: list[str], prog: str = "python main.py embed") -> None:
    run_command(embed, argv, prog, "\n\n" + __doc__[__doc__.index("The file") :].strip())
