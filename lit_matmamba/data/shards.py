"""What text and image data share: the data directory, shard folders, their index, and epochs.

A *shard folder* is what ``python main.py prepare`` writes: ``index.json`` next to WebDataset tar
shards named ``<split>-NNNNN.tar``. Both modalities locate it the same way (a local path, a URL
that webdataset's ``gopen`` opens, or a ``{}`` template for ``pipe:``), read its index with the
same checks of format and version, write it through the same atomic publish with the same fixed
tar metadata, check each shard against the sha256 its index lists with the same reader, and feed
it to Lightning through the same epoch-setting loader. What the index holds, and how each
modality splits its samples over ranks and workers, stays in its own module.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import sys
import tarfile
import threading
import uuid
import warnings
from collections.abc import Callable, Iterator, MutableSet, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from webdataset.gopen import gopen

INDEX_NAME = "index.json"


class ShardError(ValueError):
    """Shards that disagree with their index.json, or cannot be read; the message names the shard."""


def default_data_dir() -> Path:
    """Where default data sets are built and cached: ``$LIT_MATMAMBA_DATA``, else ``./data``."""
    return Path(os.environ.get("LIT_MATMAMBA_DATA") or "data")


# --------------------------------------------------------------------------- locations


def is_url(location: str) -> bool:
    """Whether ``location`` is for webdataset's ``gopen`` (``https://``, ``file:``, ``pipe:``...) rather than a path."""
    return "://" in location or location.startswith("pipe:")


def locate(location: str | os.PathLike) -> Callable[[str], str]:
    """Map the file names of a shard folder (index.json, shards, tokenizer.json) to paths or URLs.

    ``location`` is a local folder, the local path or URL of its ``index.json``, a URL prefix that
    webdataset's ``gopen`` reads (``https://host/data``, ``file:``, ``gs://``), or a template where
    ``{}`` stands for the file name, which ``pipe:`` needs (``pipe:aws s3 cp s3://bucket/data/{} -``).
    """
    location = os.fspath(location)
    if "{}" in location:
        return lambda name: location.replace("{}", name)
    if location.startswith("pipe:"):
        raise ValueError(
            f"{location!r}: a pipe: location needs {{}} where the file name goes, "
            f"e.g. 'pipe:aws s3 cp s3://bucket/data/{{}} -'"
        )
    if is_url(location):
        base = location.rsplit("/", 1)[0] if location.endswith(".json") else location.rstrip("/")
        return lambda name: f"{base}/{name}"
    folder = Path(location).parent if location.endswith(".json") else Path(location)
    return lambda name: str(folder / name)


def index_location(location: str | os.PathLike) -> str:
    """The index file of a shard folder given as for :func:`locate`: the ``.json`` itself when one is named."""
    location = os.fspath(location)
    if location.endswith(".json") and "{}" not in location:
        return location
    return locate(location)(INDEX_NAME)


def read_index(location: str | os.PathLike, format_name: str, version: int, made_by: str) -> tuple[dict, str]:
    """Read a shard folder's index and check its format and version; returns ``(index, where it was read)``.

    Args:
        location: The shard folder or its index, as for :func:`locate`.
        format_name: The ``"format"`` the index must have.
        version: The ``"version"`` the index must have.
        made_by: The command that makes such a folder, named in the errors.

    Raises:
        FileNotFoundError: No index there. OSError: it cannot be read. ValueError: it is not valid JSON,
        or of another format or version. The checks of its content belong to the caller.
    """
    where = index_location(location)
    try:
        if is_url(where):
            with gopen(where, "rb") as stream:
                raw = stream.read()
        else:
            raw = Path(where).read_bytes()
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"{where} not found: point data_dir at a folder made by `{made_by}`, or run that first"
        ) from e
    except OSError as e:
        raise OSError(f"could not read {where}: {e}") from e
    try:
        index = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{where} is not valid JSON ({e}): run `{made_by}` again") from e
    found = index.get("format") if isinstance(index, dict) else type(index).__name__
    if found != format_name:
        raise ValueError(f"{where} is not a {format_name} index (format {found!r}): make it with `{made_by}`")
    if index.get("version") != version:
        raise ValueError(
            f"{where} has format version {index.get('version')!r}, this code reads version {version}: "
            f"run `{made_by}` again with this version of lit-matmamba"
        )
    return index, where


def check_shards_exist(shards: Sequence[str], what: str) -> None:
    """Raise FileNotFoundError naming the local shards of ``what`` that are missing.

    Checked up front so that a copy that lost files fails at setup, not hours into an epoch; URLs
    are left to the reader, which names the shard when it cannot open it.
    """
    missing = [shard for shard in shards if not is_url(shard) and not Path(shard).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{what}: {len(missing)} shard(s) listed in the index not found: {listing(missing)}: "
            f"the dataset is incomplete; copy it again or re-run prepare"
        )


def listing(items: Sequence[str], limit: int = 10) -> str:
    """``items`` joined for a message, the first ``limit`` of them and a count of the rest."""
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


# --------------------------------------------------------------------------- writing


@contextlib.contextmanager
def publishing(output_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Give an empty hidden folder beside ``output_dir`` to write into; rename it to ``output_dir`` at the end.

    So ``output_dir`` is complete or absent: an error, an interrupt or SIGTERM inside the block
    removes the temporary folder and leaves ``output_dir`` as it was. With ``overwrite`` an existing
    ``output_dir`` stays until the new one is complete.

    Inside the block SIGTERM raises ``SystemExit(143)`` (after any handler installed before runs), so
    that this cleanup, and the caller's, runs. A process killed outright (SIGKILL, power loss) cannot
    clean up: its temporary folders are named after its host and process id, and the next
    ``publishing`` into the same parent removes those whose process is gone (this host's only; a
    folder of a live process is never touched), saying so in one line on stderr.

    Raises:
        FileExistsError: ``output_dir`` exists and ``overwrite`` is off, at the start; or, at the end,
            another process published it meanwhile. Callers that build a shared cache take the latter
            as success: what the other process wrote is what they would have written.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(
            f"{output_dir} already exists: pass overwrite=True (--overwrite true) to replace it"
        )
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output_dir.parent)
    # mkdir rather than mkdtemp, so that the published folder gets the usual permissions.
    tmp = _temporary_name(output_dir, "tmp")
    tmp.mkdir()
    with _sigterm_raises():
        try:
            yield tmp
            if output_dir.exists() and overwrite:
                old = _temporary_name(output_dir, "old")
                os.rename(output_dir, old)
                os.rename(tmp, output_dir)
                shutil.rmtree(old)
            else:
                # rename onto an empty folder succeeds on POSIX, so look first.
                if output_dir.exists():
                    raise FileExistsError(f"{output_dir} appeared while writing it")
                try:
                    os.rename(tmp, output_dir)
                except OSError as e:
                    raise FileExistsError(f"{output_dir} appeared while writing it: {e}") from e
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


# `.<output name>.<tmp|old>-<host>-<pid>-<32 hex digits>`: whose it is, readable from the name alone.
_TEMPORARY = re.compile(r"^\.(?P<name>.+?)\.(?:tmp|old)-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{32}$")


def _temporary_name(output_dir: Path, kind: str) -> Path:
    return output_dir.with_name(
        f".{output_dir.name}.{kind}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}"
    )


def _process_gone(host: str, pid: int) -> bool:
    """Whether process ``pid`` of ``host`` has certainly ended; False when that cannot be told."""
    # Another host's processes cannot be seen; os.kill(pid, 0) would terminate the process on Windows.
    if host != socket.gethostname() or os.name != "posix":
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: another user's live process
        return False
    return False


def remove_stale_temporaries(parent: str | os.PathLike) -> list[str]:
    """Remove the temporary folders that :func:`publishing` left in ``parent`` when its process was killed.

    Only folders of this host whose process has ended are removed (a recycled process id keeps a
    folder, never the reverse); one line on stderr names them. Returns their names.
    """
    parent = Path(parent)
    stale = []
    for entry in sorted(os.scandir(parent), key=lambda e: e.name) if parent.is_dir() else ():
        match = _TEMPORARY.match(entry.name)
        if match and entry.is_dir(follow_symlinks=False) and _process_gone(match["host"], int(match["pid"])):
            shutil.rmtree(entry.path, ignore_errors=True)
            if not os.path.lexists(entry.path):
                stale.append(entry.name)
    if stale:
        print(
            f"removed {len(stale)} temporary folder(s) left in {parent} by killed prepare runs: {listing(stale)}",
            file=sys.stderr,
        )
    return stale


# SIGTERM's handler from before publishing() installed its own; None while that is not installed.
_sigterm_before: Any = None


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Within the block SIGTERM raises ``SystemExit(128 + SIGTERM)`` in this process, so that cleanup runs.

    A handler installed before runs first and is restored afterwards; an ignored SIGTERM stays
    ignored. Processes forked inside the block (a writer's pool) get the handler from before.
    """
    global _sigterm_before
    previous = signal.getsignal(signal.SIGTERM)
    nested = _sigterm_before is not None
    if (
        nested
        or threading.current_thread() is not threading.main_thread()
        or previous in (signal.SIG_IGN, None)
    ):
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if callable(previous):
            previous(signum, frame)
        raise SystemExit(128 + signum)

    _sigterm_before = previous
    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _sigterm_before = None


def _restore_sigterm_in_child() -> None:
    # A Python-level handler misses a signal that comes just before a blocking call starts (it only
    # sets a flag): a pool worker waiting on its queue would then never die of pool.terminate().
    global _sigterm_before
    if _sigterm_before is not None:
        signal.signal(signal.SIGTERM, _sigterm_before)
        _sigterm_before = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_restore_sigterm_in_child)


def data_sha256(checksums: dict[str, Sequence[str | None]]) -> str | None:
    """The identity of a shard folder: sha256 of its shards' sha256 per split (recorded in training
    checkpoints, compared on resume and validation); None when a shard's is unknown (an index
    written before checksums) or there are no shards (an image folder read directly)."""
    if not checksums or any(sha is None for shas in checksums.values() for sha in shas):
        return None
    canonical = json.dumps({split: list(shas) for split, shas in sorted(checksums.items())})
    return hashlib.sha256(canonical.encode()).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file (a shard's checksum; which tokenizer made a set of shards; that a download is the pinned one)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_name(split: str, number: int) -> str:
    """File name of shard ``number`` of ``split``."""
    return f"{split}-{number:05d}.tar"


def open_shard(path: str | os.PathLike) -> tarfile.TarFile:
    """A new tar shard for writing; USTAR, which every tar reader (webdataset's included) takes."""
    return tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add ``data`` as member ``name``, with fixed metadata so that a re-run writes byte-identical shards."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = 0, 0o644, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(data))


# --------------------------------------------------------------------------- reading


def warn_unverifiable(where: str, made_by: str) -> None:
    """Warn that the index at ``where`` lists no sha256 for its shards, so damage to them goes unnoticed."""
    warnings.warn(
        f"{where} lists no sha256 of its shards (it was written before lit-matmamba recorded them), so a "
        f"damaged shard cannot be detected: run `{made_by}` again with --overwrite true to add them (a default "
        f"data set: delete its folder and it is rebuilt)",
        stacklevel=3,
    )


class CheckedShard:
    """A shard open for reading, as :func:`open_checked` gives it: ``read()`` it, then call :meth:`finish`."""

    def __init__(self, stream: Any, url: str, sha256: str | None, verified: MutableSet[str]):
        self.stream, self.url, self.sha256, self.verified = stream, url, sha256, verified
        self.digest = hashlib.sha256() if sha256 is not None else None

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        if self.digest is not None:
            self.digest.update(data)
        return data

    def finish(self) -> None:
        """Call once every sample of the shard has been read: checks the sha256 of the stream, if still due.

        Reads what the tar reader left unread (the end-of-archive blocks), so it costs nothing more.
        """
        if self.digest is None:
            return
        for _ in iter(lambda: self.read(1 << 20), b""):
            pass
        check_sha256(self.url, self.sha256, self.digest.hexdigest())
        self.verified.add(self.url)
        self.digest = None


@contextlib.contextmanager
def open_checked(url: str, sha256: str | None, verified: MutableSet[str]) -> Iterator[CheckedShard]:
    """Open shard ``url`` for reading; the first time (``url`` not in ``verified``) check it against ``sha256``.

    A local shard is hashed before its first byte is returned (a second read, from the page cache),
    so a damaged shard fails before any of its samples is used. A URL is hashed as it streams, and
    checked by :meth:`CheckedShard.finish` when a reader has read the whole shard: with every shard
    read to its end once per epoch, a damaged one fails within the epoch, after its samples were
    read. A checked ``url`` is added to ``verified`` (the caller's set, one per dataset, so each
    worker checks each shard once). ``sha256`` None (an index without checksums): no check.

    Raises:
        ShardError: the shard's sha256 differs from ``sha256``; the message names the shard, both
            hashes and the fix.
    """
    due = sha256 is not None and url not in verified
    if due and not is_url(url):
        check_sha256(url, sha256, file_sha256(url))
        verified.add(url)
        due = False
    with gopen(url, "rb") as stream:
        yield CheckedShard(stream, url, sha256 if due else None, verified)


def check_sha256(url: str, expected: str, actual: str) -> None:
    """Raise :class:`ShardError` naming shard ``url`` when its sha256 ``actual`` is not the index's ``expected``."""
    if actual != expected:
        raise ShardError(
            f"shard {url} is damaged or not the file its {INDEX_NAME} was written with: its sha256 is {actual}, "
            f"the index lists {expected}; copy (or download) it again, or re-run prepare"
        )


# --------------------------------------------------------------------------- loading


def rank_and_world_size(trainer: Any = None) -> tuple[int, int]:
    """This process's rank and the number of ranks: the trainer's, else torch.distributed's, else 0 and 1."""
    if trainer is not None:
        return trainer.global_rank, trainer.world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class SplitLoaders:
    """Lightning's four dataloader hooks for a datamodule with ``dataloader(split)``: train, val
    and test read their splits; predict (``main.py predict``) reads the test split. Mix it in before
    ``L.LightningDataModule``."""

    def train_dataloader(self) -> DataLoader:
        return self.dataloader("train")

    def val_dataloader(self) -> DataLoader:
        return self.dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.dataloader("test")

    def predict_dataloader(self) -> DataLoader:
        """`main.py predict` runs over the test split."""
        return self.dataloader("test")


class EpochLoader(DataLoader):
    """A DataLoader that tells its dataset where the epoch starts each time it is iterated.

    Lightning calls ``set_epoch`` only on samplers, and a DataLoader over an IterableDataset has
    none. ``position()`` gives ``(epoch, batches of it already consumed)`` from the trainer, or None
    outside a fit, where the n-th iteration over this loader is epoch n. Either way all ranks agree
    on it, hence on the order of the data. The dataset takes it with ``set_position(epoch, skip)``.
    """

    def __init__(self, dataset: Any, position: Callable[[], tuple[int, int] | None], **kwargs: Any):
        super().__init__(dataset, **kwargs)
        self.position = position
        self.iterations = 0

    def __iter__(self):
        position = self.position()
        epoch, skip = position if position is not None else (self.iterations, 0)
        self.iterations += 1
        self.dataset.set_position(epoch, skip)
        return super().__iter__()
