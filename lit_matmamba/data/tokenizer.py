"""The default tokenizer: a byte-level BPE trained offline with Hugging Face ``tokenizers``.

Any ``tokenizers`` ``tokenizer.json`` works for :func:`~lit_matmamba.data.prepare_text.prepare_text`;
this module only trains, caches and loads one when the user brings none.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 4096, eos_token: str = EOS_TOKEN
) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenisation, no unknown tokens) on ``texts``.

    Training is deterministic: the same texts in the same order give the same ``tokenizer.json``.

    Args:
        texts: Documents to learn merges from (the train split only, to keep held-out text unseen).
        vocab_size: Target vocabulary size including the 256 byte tokens and ``eos_token``; a small
            corpus can end with fewer tokens when it runs out of pairs seen at least twice.
        eos_token: Special token appended after every document; gets id 0.
    """
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be at least 257 (256 bytes + {eos_token!r}), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def ensure_bpe_tokenizer(path: str | Path, texts: Iterable[str], vocab_size: int = 4096) -> Path:
    """Return ``path``, training a BPE on ``texts`` and saving it there first if it does not exist.

    The file is written to a temporary name and renamed, so a cached file is always complete.
    """
    path = Path(path)
    if path.exists():
        return path
    tokenizer = train_bpe_tokenizer(texts, vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        tmp.write_text(tokenizer.to_str(pretty=True), encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json``, with an error that names the file when it is missing or invalid."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer file {path} not found: give the path of a tokenizers `tokenizer.json`"
        )
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise ValueError(f"{path} is not a valid tokenizers `tokenizer.json`: {e}") from e
