"""Checkpoint files across strategies: a distributed checkpoint read on one process, a single file
written as a distributed checkpoint, optimizer state keyed by parameter name."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

# Lightning's name for the file of a distributed checkpoint that holds everything but the tensors.
METADATA_FILENAME = "meta.pt"


def load_full_checkpoint(path: str | Path, tensors: bool = True) -> dict[str, Any]:
    """A distributed checkpoint (the directory ModelParallelStrategy writes: one file per rank and
    `meta.pt`) read on one process, without a process group, as a single-file Lightning checkpoint
    reads: its entries (`matmamba`, `epoch`, loops, ...) and the whole `state_dict`, in the
    canonical layout (`layout.py`), on the CPU. The optimizer state is left out.

    The whole state dict must fit in CPU memory. `tensors=False`: a look at the entries only, the
    `state_dict` as tensors of the right shapes and dtypes on the meta device (no shard is read).
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    path = Path(path)
    if not (path / METADATA_FILENAME).is_file() or not (path / ".metadata").is_file():
        raise ValueError(
            f"{path} is not a distributed checkpoint (a directory with .metadata and {METADATA_FILENAME}, "
            f"as ModelParallelStrategy writes)"
        )
    checkpoint = torch.load(path / METADATA_FILENAME, map_location="cpu", weights_only=False)
    if not tensors:
        # The index flattens nested keys: "state_dict.<parameter name>".
        index = FileSystemReader(path).read_metadata().state_dict_metadata
        checkpoint["state_dict"] = {
            key.removeprefix("state_dict."): torch.empty(
                entry.size, dtype=entry.properties.dtype, device="meta"
            )
            for key, entry in index.items()
            if key.startswith("state_dict.") and isinstance(entry, TensorStorageMetadata)
        }
        return checkpoint
    loaded: dict[str, Any] = {}
    _load_state_dict(
        loaded,
        storage_reader=FileSystemReader(path),
        planner=_EmptyStateDictLoadPlanner(keys={"state_dict"}),  # not the optimizer's
        no_dist=True,
    )
    checkpoint["state_dict"] = loaded["state_dict"]
    return checkpoint


def key_optimizer_states_by_name(
    checkpoint: dict[str, Any], module: torch.nn.Module, optimizers: list, by_module_order: bool
) -> None:
    """Key the optimizer states of a Lightning checkpoint being saved by parameter name instead of
    position, so that a single-file checkpoint resumes under any strategy.

    Lightning keys a one-process (or DDP) run's optimizer state by position in the optimizer's
    groups, but one written by ModelParallelStrategy by position in `module.parameters()`, and
    reads a single file under ModelParallelStrategy in the second order: the one-process
    checkpoint's state would land on the wrong parameters. By name, both read it right
    (`torch.optim.Optimizer.load_state_dict` pairs the saved groups' entries with its parameters
    by position, whatever the keys; ModelParallelStrategy pairs them by name).

    Args:
        checkpoint: the checkpoint dict (`on_save_checkpoint`); states already keyed by name (a
            distributed checkpoint's) or empty (ranks other than 0) are left alone.
        module: the LightningModule (names are its `named_parameters()`).
        optimizers: the optimizers, in the checkpoint's order.
        by_module_order: the positions are in `module.parameters()` (ModelParallelStrategy's
            single file), not in the optimizer's groups.
    """
    names = {id(p): n for n, p in module.named_parameters()}
    for state, optimizer in zip(checkpoint.get("optimizer_states", []), optimizers):
        groups = state.get("param_groups") if isinstance(state, dict) else None
        keys = [k for group in groups or [] for k in group["params"]]
        if not keys or not isinstance(keys[0], int):
            continue
        if by_module_order:
            order = list(names.values())
        else:
            order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
        state["state"] = {order[k]: v for k, v in state["state"].items()}
        state["param_groups"] = [{**g, "params": [order[k] for k in g["params"]]} for g in groups]


def to_distributed_checkpoint(path: str | Path, directory: str | Path) -> Path:
    """Write the single-file Lightning checkpoint `path` as a distributed checkpoint in `directory`
    (what ModelParallelStrategy writes and reads: the tensors by `torch.distributed.checkpoint`,
    the rest in `meta.pt`), on one process. Returns the directory.

    ModelParallelStrategy loads a single file one parameter at a time, which cannot convert the
    layouts of a sharded mixer (`layout.py`: the load hooks would also see the parameters not being
    loaded); a distributed checkpoint loads the whole state dict at once. `main.py` converts a
    single-file `--ckpt_path` this way under ModelParallelStrategy. The optimizer states must be
    keyed by name (`key_optimizer_states_by_name`, which this project's checkpoints are).
    """
    import torch.distributed.checkpoint as dcp

    directory = Path(directory)
    from lit_matmamba.io import read_checkpoint

    checkpoint = read_checkpoint(path)
    tensors = {"state_dict": checkpoint.pop("state_dict")}
    for i, state in enumerate(checkpoint.pop("optimizer_states", [])):
        tensors[f"optimizer_{i}"] = state
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process")
        dcp.save(tensors, checkpoint_id=directory, no_dist=True)
    torch.save(checkpoint, directory / METADATA_FILENAME)
    return directory
