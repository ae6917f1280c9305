"""The ``prepare`` step for text: tokenize raw text into fixed-length sequences in WebDataset tar shards.

Example (command line; ``--help`` explains every option)::

    python main.py prepare text --output_dir data/fineweb-neox \\
        --tokenizer gpt-neox/tokenizer.json --train 'fineweb/*.parquet' --val_fraction 0.001

Output directory layout::

    index.json             what the loader needs (see below)
    tokenizer.json         a copy of the tokenizer that made the shards
    {split}-{i:05d}.tar    shards: one tar member ``{key}.tokens.npy`` per sequence, where ``key`` is the
                           sequence's index in its split as 10 digits and the member is a ``.npy`` array
                           of shape ``(seq_len,)``, dtype uint16 if the vocabulary fits in 16 bits, else
                           uint32 (little-endian). ``webdataset.WebDataset(url).decode()`` reads it as
                           ``sample["tokens.npy"]``.

``index.json``::

    {"format": "lit-matmamba-tokens", "version": 1,
     "tokenizer": {"file": "tokenizer.json", "source": <path given>, "sha256": <of tokenizer.json>},
     "vocab_size": int, "eos_token": str, "eos_id": int, "dtype": "uint16" | "uint32", "seq_len": int,
     "splits": {<split>: {"shards": [{"name": "train-00000.tar", "sequences": int, "sha256": str}, ...],
                          "sequences": int, "tokens": int, "text_bytes": int, "documents": int,
                          "dropped_tokens": int, "inputs": [str, ...]}}}

``tokens`` is the number of stored tokens (``sequences * seq_len``, end-of-document tokens included) and
``text_bytes`` the number of UTF-8 bytes of text that produced them, so bits per byte is
``loss_nats / ln 2 * tokens / text_bytes``. The token stream of a split is cut into sequences without
padding; its last ``dropped_tokens`` (< ``seq_len``) tokens are not stored and their text is not counted.
``sha256`` is that of the shard file; readers check it the first time they open a shard. Indexes written
before it was recorded have none and are still read, with a warning that their shards cannot be checked.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import hashlib
import io
import itertools
import json
import shutil
import tarfile
import zlib
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from lit_matmamba.data.shards import INDEX_NAME, add_member, file_sha256, open_shard, publishing, shard_name
from lit_matmamba.data.tokenizer import EOS_TOKEN, load_tokenizer

FORMAT_NAME = "lit-matmamba-tokens"
FORMAT_VERSION = 1
INPUT_SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".parquet")
SPLITS = ("train", "val", "test")
# Bytes of each text input checked before any tokenizing: enough to tell a binary file from text.
_SNIFF_BYTES = 1 << 16
# Documents are tokenized in groups so that `tokenizers` can use all cores.
_ENCODE_GROUP_DOCS = 512
_ENCODE_GROUP_CHARS = 8 << 20


def prepare_text(
    output_dir: str | Path,
    tokenizer: str | Path,
    train: str | list[str],
    val: str | list[str] | None = None,
    test: str | list[str] | None = None,
    val_fraction: float = 0.0,
    test_fraction: float = 0.0,
    seq_len: int = 2048,
    sequences_per_shard: int = 4096,
    text_field: str = "text",
    eos_token: str = EOS_TOKEN,
    split_seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize text files into fixed-length token sequences stored as WebDataset tar shards.

    Every document is tokenized, followed by the end-of-document token, and the documents of a split are
    concatenated into one token stream that is cut into sequences of ``seq_len`` tokens. Input files:
    ``.txt`` (the whole file is one document), ``.jsonl`` (one JSON object per line, the document is
    field ``text_field``), ``.parquet`` (column ``text_field``, e.g. FineWeb; needs pyarrow), and
    ``.txt.gz``/``.jsonl.gz``. An input may be a file, a directory (all such files below it, sorted) or a
    glob pattern. Output is written to a temporary directory next to ``output_dir`` and renamed into
    place at the end, so ``output_dir`` is complete or absent (an error, Ctrl-C or SIGTERM removes
    the temporary directory; one left by a killed run is removed by the next run), and the same
    inputs always give byte-identical shards; index.json lists the sha256 of each shard, which
    readers check.

    Inputs that are not text fail before any tokenizing, with an error naming the file: a
    ``.txt``/``.jsonl`` file whose first 64 KiB hold a NUL byte or are not UTF-8, a ``.gz`` that is
    not gzip, a ``.parquet`` that pyarrow cannot open or that lacks the text column. Past the first
    64 KiB, a NUL byte in a ``.txt`` file (in a ``.jsonl`` line it is invalid JSON), invalid UTF-8 or
    a damaged ``.gz`` fails when the file is reached. A file is never skipped: the shards hold
    exactly the inputs named. (A NUL character written as ``\\u0000`` in JSON, or inside a parquet
    string, is data and is kept.)

    Args:
        output_dir: Directory to create: shards, index.json and a copy of the tokenizer.
        tokenizer: Path of a Hugging Face ``tokenizers`` tokenizer.json (e.g. GPT-NeoX's).
        train: Input file(s), directory(ies) or glob pattern(s) for the train split.
        val: Inputs for the validation split; or leave empty and use ``val_fraction``.
        test: Inputs for the optional test split; or use ``test_fraction``.
        val_fraction: Fraction of the train documents held out for validation, chosen by a hash of
            the document text and ``split_seed`` (identical documents go to the same split).
        test_fraction: Fraction of the train documents held out for test, chosen the same way.
        seq_len: Tokens per stored sequence. The loader can cut stored sequences into shorter ones but
            not make them longer.
        sequences_per_shard: Sequences per tar shard (the last shard of a split may hold fewer).
        text_field: JSON field / parquet column that holds the document text.
        eos_token: Token appended after every document; must be in the tokenizer's vocabulary.
        split_seed: Seed of the hash that picks held-out documents.
        overwrite: Replace ``output_dir`` if it exists (the old one stays until the new one is complete).
        progress: Show a progress bar.

    Returns:
        The content of index.json.
    """
    output_dir = Path(output_dir)
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    if sequences_per_shard < 1:
        raise ValueError(f"sequences_per_shard must be at least 1, got {sequences_per_shard}")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("val_fraction and test_fraction must be in [0, 1) with a sum below 1")
    for name, inputs, fraction in (("val", val, val_fraction), ("test", test, test_fraction)):
        if inputs and fraction > 0:
            raise ValueError(f"give either {name} inputs or {name}_fraction, not both")

    sources = {"train": _expand_inputs(train, "train")}
    if val:
        sources["val"] = _expand_inputs(val, "val")
    if test:
        sources["test"] = _expand_inputs(test, "test")
    for path in dict.fromkeys(p for paths in sources.values() for p in paths):
        check_input(path, text_field)
    splits = [
        s for s in SPLITS if s in sources or (s == "val" and val_fraction) or (s == "test" and test_fraction)
    ]

    tok = load_tokenizer(tokenizer)
    # A literal "<|endoftext|>" inside a document is text, not a document boundary.
    tok.encode_special_tokens = True
    eos_id = tok.token_to_id(eos_token)
    if eos_id is None:
        specials = sorted(t.content for t in tok.get_added_tokens_decoder().values() if t.special)
        raise ValueError(
            f"tokenizer {tokenizer} has no token {eos_token!r}: pass eos_token (--eos_token) as one of its "
            f"special tokens {specials}"
        )
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    dtype = np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")

    with publishing(output_dir, overwrite) as tmp:
        writers = {s: _SplitWriter(tmp, s, seq_len, sequences_per_shard, dtype, eos_id) for s in splits}
        with tqdm(desc="tokenizing", unit=" docs", disable=not progress) as bar:
            for source, paths in sources.items():
                documents = itertools.chain.from_iterable(iter_documents(p, text_field) for p in paths)
                for group in _groups(documents):
                    for text, ids in zip(group, _encode(tok, group)):
                        split = source
                        if source == "train":
                            split = _holdout_split(text, val_fraction, test_fraction, split_seed)
                        writers[split].add(text, ids)
                    bar.update(len(group))
                    bar.set_postfix(tokens=sum(w.total_tokens for w in writers.values()))
        entries = {s: writers[s].close(tok) for s in splits}
        for s, entry in entries.items():
            if entry["sequences"] == 0:
                raise ValueError(
                    f"split {s!r} is empty: its {entry['documents']} documents gave "
                    f"{entry['dropped_tokens']} tokens, fewer than one sequence of seq_len={seq_len}; "
                    f"give more text or a smaller seq_len"
                )
            entry["inputs"] = [str(p) for p in sources.get(s, sources["train"])]
        shutil.copyfile(tokenizer, tmp / "tokenizer.json")
        index = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "tokenizer": {
                "file": "tokenizer.json",
                "source": str(tokenizer),
                "sha256": file_sha256(tokenizer),
            },
            "vocab_size": vocab_size,
            "eos_token": eos_token,
            "eos_id": eos_id,
            "dtype": dtype.name,
            "seq_len": seq_len,
            "splits": entries,
        }
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    return index


def iter_documents(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """Yield the non-empty documents of one input file (see :func:`prepare_text` for the formats)."""
    path = Path(path)
    kind = _input_kind(path)
    try:
        if kind == ".parquet":
            yield from _parquet_documents(path, text_field)
        elif kind in (".txt", ".txt.gz"):
            with _open_text(path) as f:
                text = f.read()
            if (nul := text.find("\0")) >= 0:
                raise _not_text(path, f"character {nul}")
            if text:
                yield text
        else:
            with _open_text(path) as f:
                for line_no, line in enumerate(f, 1):
                    if line.strip():
                        text = _json_field(line, text_field, f"{path}:{line_no}")
                        if text:
                            yield text
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e}): convert it to UTF-8") from e
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise ValueError(f"{path} is damaged ({e}): repair it or leave it out of the inputs") from e


def check_input(path: str | Path, text_field: str = "text") -> None:
    """Raise ValueError naming ``path`` if it cannot be an input of its kind; cheap (see :func:`prepare_text`).

    ``.txt``/``.jsonl`` (``.gz``): the first 64 KiB must be UTF-8 without NUL bytes. ``.parquet``: the
    file must open and have a text column ``text_field``.
    """
    path = Path(path)
    kind = _input_kind(path)
    if kind == ".parquet":
        _parquet_file(path, text_field)
        return
    try:
        with gzip.open(path, "rb") if kind.endswith(".gz") else open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise ValueError(
            f"{path} is not a readable {kind} file ({e}): repair it or leave it out of the inputs"
        ) from e
    if (nul := head.find(b"\0")) >= 0:
        raise _not_text(path, f"byte {nul}")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < _SNIFF_BYTES)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e}): convert it to UTF-8") from e


def _not_text(path: Path, where: str) -> ValueError:
    return ValueError(
        f"{path} is not text: it holds a NUL byte (first at {where}), as binary or damaged files do; "
        f"leave it out of the inputs, or repair it"
    )


def _input_kind(path: Path) -> str:
    for suffix in INPUT_SUFFIXES:
        if path.name.endswith(suffix):
            return suffix
    raise ValueError(
        f"unsupported input file type: {path} (supported: {', '.join(INPUT_SUFFIXES)}); "
        f"convert it, or give the directory or glob pattern of the supported files only"
    )


def _expand_inputs(spec: str | list[str], split: str) -> list[Path]:
    """Turn files, directories and glob patterns into a sorted, checked list of input files."""
    paths: list[Path] = []
    for item in [spec] if isinstance(spec, (str, Path)) else spec:
        item = str(item)
        if any(c in item for c in "*?["):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not matches:
                raise FileNotFoundError(f"{split} input pattern {item!r} matches no file")
            paths += matches
        elif Path(item).is_dir():
            found = sorted(
                p for p in Path(item).rglob("*") if p.is_file() and p.name.endswith(INPUT_SUFFIXES)
            )
            if not found:
                raise FileNotFoundError(
                    f"{split} input directory {item} has no {'/'.join(INPUT_SUFFIXES)} files"
                )
            paths += found
        elif Path(item).is_file():
            paths.append(Path(item))
        else:
            raise FileNotFoundError(f"{split} input {item} not found")
    for path in paths:
        _input_kind(path)
    if not paths:
        raise ValueError(f"no {split} inputs given")
    return paths


def _open_text(path: Path) -> IO[str]:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _json_field(line: str, field: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not a JSON object ({e})") from e
    if not isinstance(record, dict) or field not in record:
        fields = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{where}: no field {field!r} (found {fields}): pass text_field (--text_field NAME)")
    text = record[field]
    if not isinstance(text, str):
        raise ValueError(f"{where}: field {field!r} is {type(text).__name__}, not text")
    return text


def _parquet_file(path: Path, column: str) -> Any:
    """The ``pyarrow.parquet.ParquetFile`` of ``path``, checked to have text column ``column``."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"reading {path} needs pyarrow: pip install 'lit-matmamba[parquet]'") from e
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(
            f"{path} is not a readable parquet file ({e}): repair it or leave it out of the inputs"
        ) from e
    schema = parquet.schema_arrow
    if column not in schema.names:
        raise ValueError(
            f"{path} has no column {column!r} (columns: {schema.names}): pass text_field (--text_field NAME)"
        )
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f"{path}: column {column!r} has type {kind}, not text")
    return parquet


def _parquet_documents(path: Path, column: str) -> Iterator[str]:
    parquet = _parquet_file(path, column)
    for batch in parquet.iter_batches(batch_size=1024, columns=[column]):
        for text in batch.column(0).to_pylist():
            if text:
                yield text


def _groups(documents: Iterator[str]) -> Iterator[list[str]]:
    group: list[str] = []
    chars = 0
    for text in documents:
        group.append(text)
        chars += len(text)
        if len(group) >= _ENCODE_GROUP_DOCS or chars >= _ENCODE_GROUP_CHARS:
            yield group
            group, chars = [], 0
    if group:
        yield group


def _encode(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    # encode_batch_fast (tokenizers >= 0.21) skips computing offsets, which only the tail needs.
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    return [e.ids for e in encode(texts, add_special_tokens=False)]


def _holdout_split(text: str, val_fraction: float, test_fraction: float, seed: int) -> str:
    if not (val_fraction or test_fraction):
        return "train"
    digest = hashlib.blake2b(text.encode(), digest_size=8, salt=seed.to_bytes(8, "little")).digest()
    u = int.from_bytes(digest, "little") / 2**64
    return "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"


def _npy_header(dtype: np.dtype, length: int) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.zeros(length, dtype), version=(1, 0))
    return buffer.getvalue()[: -length * dtype.itemsize]


class _SplitWriter:
    """Turns one split's documents into a token stream, sequences and tar shards."""

    def __init__(
        self, directory: Path, split: str, seq_len: int, per_shard: int, dtype: np.dtype, eos_id: int
    ):
        self.directory, self.split, self.seq_len, self.per_shard = directory, split, seq_len, per_shard
        self.dtype, self.eos_id = dtype, eos_id
        self.header = _npy_header(dtype, seq_len)
        self.pending: list[np.ndarray] = []  # tokens not yet in a sequence, fewer than seq_len in all
        self.pending_len = 0
        # The latest documents (text, tokens with EOS) that the unstored tail of the stream can reach.
        self.recent: deque[tuple[str, int]] = deque()
        self.recent_tokens = 0
        self.documents = self.total_tokens = self.text_bytes = self.sequences = 0
        self.shards: list[dict[str, Any]] = []
        self.tar: tarfile.TarFile | None = None

    def add(self, text: str, ids: list[int]) -> None:
        tokens = np.empty(len(ids) + 1, self.dtype)
        tokens[:-1] = ids
        tokens[-1] = self.eos_id
        self.documents += 1
        self.total_tokens += len(tokens)
        self.text_bytes += len(text.encode())
        self.recent.append((text, len(tokens)))
        self.recent_tokens += len(tokens)
        while self.recent_tokens - self.recent[0][1] >= self.seq_len:
            self.recent_tokens -= self.recent.popleft()[1]

        self.pending.append(tokens)
        self.pending_len += len(tokens)
        if self.pending_len >= self.seq_len:
            stream = np.concatenate(self.pending)
            full = len(stream) // self.seq_len * self.seq_len
            for start in range(0, full, self.seq_len):
                self._write(stream[start : start + self.seq_len])
            self.pending = [stream[full:]]
            self.pending_len = len(stream) - full

    def _write(self, sequence: np.ndarray) -> None:
        if self.tar is None:
            name = shard_name(self.split, len(self.shards))
            # Stays open across add() calls until the shard is full or the split ends.
            self.tar = open_shard(self.directory / name)
            self.shards.append({"name": name, "sequences": 0})
        add_member(self.tar, f"{self.sequences:010d}.tokens.npy", self.header + sequence.tobytes())
        self.sequences += 1
        self.shards[-1]["sequences"] += 1
        if self.shards[-1]["sequences"] == self.per_shard:
            self._close_shard()

    def _close_shard(self) -> None:
        self.tar.close()
        self.tar = None
        self.shards[-1]["sha256"] = file_sha256(self.directory / self.shards[-1]["name"])

    def close(self, tok: Tokenizer) -> dict[str, Any]:
        if self.tar is not None:
            self._close_shard()
        return {
            "shards": self.shards,
            "sequences": self.sequences,
            "tokens": self.sequences * self.seq_len,
            "text_bytes": self.text_bytes - self._unstored_bytes(tok),
            "documents": self.documents,
            "dropped_tokens": self.pending_len,
        }

    def _unstored_bytes(self, tok: Tokenizer) -> int:
        """UTF-8 bytes of the text behind the last ``pending_len`` tokens, which are not stored.

        A token boundary inside a multi-byte character counts that character as stored.
        """
        unstored, left = 0, self.pending_len
        for text, n_tokens in reversed(self.recent):
            if left == 0:
                break
            if left >= n_tokens:
                unstored += len(text.encode())
                left -= n_tokens
                continue
            # The EOS and the last `left - 1` text tokens are unstored: `n_tokens - left` text tokens stay.
            kept = n_tokens - left
            offsets = tok.encode(text, add_special_tokens=False).offsets
            end = offsets[kept - 1][1]
            unstored += len(text.encode()) - len(text[:end].encode())
            left = 0
        return unstored
