"""Reading a distributed checkpoint on one process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# Lightning's name for the file of a distributed checkpoint that holds everything but the tensors.
METADATA_FILENAME = "meta.pt"


def load_full_checkpoint(path: str | Path) -> dict[str, Any]:
    """A distributed checkpoint (the directory ModelParallelStrategy writes: one file per rank and
    `meta.pt`) read on one process, without a process group, as a single-file Lightning checkpoint
    reads: its entries (`matmamba`, `epoch`, loops, ...) and the whole `state_dict`, in the
    canonical layout (`layout.py`), on the CPU. The optimizer state is left out.

    The whole state dict must fit in CPU memory.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    path = Path(path)
    if not (path / METADATA_FILENAME).is_file() or not (path / ".metadata").is_file():
        raise ValueError(
            f"{path} is not a distributed checkpoint (a directory with .metadata and {METADATA_FILENAME}, "
            f"as ModelParallelStrategy writes)"
        )
    tensors: dict[str, Any] = {}
    _load_state_dict(
        tensors,
        storage_reader=FileSystemReader(path),
        planner=_EmptyStateDictLoadPlanner(keys={"state_dict"}),  # not the optimizer's
        no_dist=True,
    )
    checkpoint = torch.load(path / METADATA_FILENAME, map_location="cpu", weights_only=False)
    checkpoint["state_dict"] = tensors["state_dict"]
    return checkpoint
