"""Embeddings at any width and retrieval across widths: `main.py embed` and `main.py retrieval`.

Tiny models trained for one step on tiny data made here: the tests check that the commands compute
what they say (features equal the model's, metrics equal hand-computed ones), not retrieval quality.
"""

from __future__ import annotations

import gc
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import fit_one_step
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_matmamba import MatMambaLM, MatMambaVision
from lit_matmamba.cli import main
from lit_matmamba.data.prepare_images import iter_shard, load_index, open_rgb
from lit_matmamba.data.prepare_images import prepare_images as pack
from lit_matmamba.data.vision import ImageDataModule, eval_transform
from lit_matmamba.retrieval import evaluate, nearest, retrieval_metrics
from lit_matmamba.training import ImageClassification, LanguageModeling, load_model

CLASSES = ("ant", "bee", "cow")
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)  # not the defaults: embed must take the checkpoint's
IMG = 16


def _fit(module: L.LightningModule, datamodule: L.LightningDataModule, root: Path) -> Path:
    return fit_one_step(module, datamodule, root / "run" / "checkpoints" / "last.ckpt")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict:
    """An image-folder tree of random pictures (train 10, val 7), packed into shards of 3, and a
    vision-tiny checkpoint trained one step on it; the data module's arguments are recorded."""
    root = tmp_path_factory.mktemp("images")
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", 10), ("val", 7)):
        for j in range(n):
            pixels = torch.randint(0, 256, (IMG + 4, IMG + 2, 3), generator=gen, dtype=torch.uint8)
            path = root / "tree" / split / CLASSES[j % 3] / f"{split}{j:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.numpy()).save(path)
    pack(root / "tree", root / "shards", samples_per_shard=3)
    torch.manual_seed(0)
    dm = ImageDataModule(
        str(root / "shards"), batch_size=4, num_workers=0, img_size=IMG, mean=MEAN, std=STD, label_smoothing=0
    )
    model = MatMambaVision(MatMambaVision("vision-tiny").config.replace(num_classes=3))
    ckpt = _fit(ImageClassification(model), dm, root)
    return {"root": root, "ckpt": ckpt}


def _stored_images(root: Path, split: str, layout: str = "shards") -> tuple[torch.Tensor, torch.Tensor]:
    """The images of a split in stored order, eval-transformed (N, 3, IMG, IMG), and their labels
    (N,): shards in index order (prepare shuffles samples into them), or a folder's sorted files."""
    if layout == "shards":
        index, _ = load_index(root / "shards")
        entry = index["splits"][split]
        samples = [
            (data, cls)
            for shard, count in zip(entry["shards"], entry["counts"])
            for _, data, cls in iter_shard(str(root / "shards" / shard), count, len(CLASSES))
        ]
    else:
        paths = sorted((root / "tree" / split).glob("*/*.png"), key=lambda p: (p.parent.name, p.name))
        samples = [(p.read_bytes(), CLASSES.index(p.parent.name)) for p in paths]
    transform = eval_transform(IMG, mean=MEAN, std=STD)
    images = torch.stack([transform(open_rgb(data, "test")) for data, _ in samples])
    return images, torch.tensor([cls for _, cls in samples])


# --------------------------------------------------------------------------- metrics and search


def _at_angles(degrees: list[float], norms: list[float] | None = None) -> torch.Tensor:
    rad = torch.tensor(degrees) * math.pi / 180
    vectors = torch.stack([torch.cos(rad), torch.sin(rad)], dim=1)  # (N, 2)
    return vectors * torch.tensor(norms or [1.0] * len(degrees))[:, None]


@pytest.mark.parametrize("search", ["torch", "faiss"])
def test_metrics_on_a_set_with_known_neighbours(search):
    """Database at 0, 10, 20, 30, 40 degrees with labels 0 1 0 1 1; the norms are scrambled so that
    only cosine similarity, not the raw inner product, ranks by angle.

    Query at -5 deg, label 0: neighbours 0 10 20 -> relevant 1 0 1; R = 2; AP@3 = (1 + 2/3) / 2 = 5/6.
    Query at 45 deg, label 1: neighbours 40 30 20 -> relevant 1 1 0; R = 3; AP@3 = (1 + 1) / 3 = 2/3.
    Query at 15 deg, label 2 (absent): AP@3 = 0, top-1 wrong.
    top-1 = 2/3, mAP@3 = (5/6 + 2/3 + 0) / 3 = 1/2.
    """
    if search == "faiss":
        pytest.importorskip("faiss")
    database = _at_angles([0, 10, 20, 30, 40], norms=[0.1, 5.0, 1.0, 9.0, 0.3])
    queries = _at_angles([-5, 45, 15], norms=[2.0, 0.5, 1.0])
    got = evaluate(
        queries, torch.tensor([0, 1, 2]), database, torch.tensor([0, 1, 0, 1, 1]), k=3, search=search
    )
    assert got == pytest.approx({"top1": 2 / 3, "map@3": 1 / 2})


def test_map_divides_by_k_when_the_database_has_k_relevant_items():
    """MRL's mAP@k: with R >= k every query's AP is (sum of P@i at relevant ranks) / k."""
    neighbors = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    database_labels = torch.tensor([5, 5, 7, 5, 5, 5])  # label 5: R = 5 >= k = 4
    got = retrieval_metrics(neighbors, torch.tensor([5, 5]), database_labels, k=4)
    # relevant 1 1 0 1 -> (1 + 1 + 3/4) / 4; relevant 1 0 1 1 -> (1 + 2/3 + 3/4) / 4
    assert got == pytest.approx({"top1": 1.0, "map@4": ((1 + 1 + 3 / 4) + (1 + 2 / 3 + 3 / 4)) / 8})


def test_torch_and_faiss_find_the_same_neighbours(monkeypatch):
    pytest.importorskip("faiss")
    gen = torch.Generator().manual_seed(1)
    database = torch.nn.functional.normalize(torch.randn(300, 24, generator=gen), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(50, 24, generator=gen), dim=1)
    exact = (queries @ database.T).topk(10, dim=1).indices
    monkeypatch.setattr("lit_matmamba.retrieval._TORCH_BLOCK_SCORES", 7 * 300)  # blocks of 7 queries
    torch.testing.assert_close(nearest(queries, database, 10, "torch"), exact)
    torch.testing.assert_close(nearest(queries, database, 10, "faiss"), exact)
    assert nearest(queries, database[:4], 10, "torch").shape == (50, 4)  # k above the database size


def test_bad_retrieval_input_is_a_clear_error():
    labels = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="queries have 8 dimensions and the database 16"):
        evaluate(torch.randn(3, 8), labels, torch.randn(3, 16), labels)
    with pytest.raises(ValueError, match="no labels"):
        evaluate(torch.randn(3, 8), labels - 1, torch.randn(3, 8), labels)
    with pytest.raises(ValueError, match="search must be"):
        nearest(torch.randn(3, 8), torch.randn(3, 8), 1, "annoy")


# --------------------------------------------------------------------------- embed


@pytest.mark.parametrize("layout", ["shards", "tree"])
def test_image_ids_are_stored_positions_with_workers_and_in_every_mode(images, layout):
    """`mode="eval"` reads the train split once, unaugmented; ids name the stored positions."""
    dm = ImageDataModule(
        str(images["root"] / layout),
        batch_size=2,
        num_workers=2,
        img_size=IMG,
        mean=MEAN,
        std=STD,
        mixup_alpha=0.0,
        cutmix_alpha=0.0,
    )
    dm.setup()
    stored, labels = _stored_images(images["root"], "train", layout)
    batches = list(dm.dataloader("train", rank=0, world_size=1, mode="eval", with_ids=True))
    got_images, got_labels, ids = (torch.cat(x) for x in zip(*batches))
    assert sorted(ids.tolist()) == list(range(10))
    torch.testing.assert_close(got_images, stored[ids])
    assert torch.equal(got_labels, labels[ids])
    train = list(dm.dataloader("train", rank=0, world_size=1, with_ids=True))  # augmented, shuffled
    assert sorted(torch.cat([ids for _, _, ids in train]).tolist()) == list(range(10))
    soft_targets = torch.cat([t for _, t, _ in train])  # label smoothing on: (10, 3)
    assert torch.equal(soft_targets.argmax(1), labels[torch.cat([ids for _, _, ids in train])])
    del batches, train
    gc.collect()  # shut down this test's persistent workers now (see test_vision_data._collect_loaders)


@pytest.mark.parametrize("width", [16, [64, 8]], ids=["w16", "mixnmatch"])
def test_embeddings_at_a_width_equal_the_backbones_features(images, tmp_path, width):
    out = tmp_path / "train.pt"
    args = ["--width", json.dumps(width), "--split", "train", "--output", str(out), "--progress", "false"]
    main(["embed", "--ckpt_path", str(images["ckpt"]), *args])
    emb = torch.load(out)
    model = load_model(str(images["ckpt"])).eval()
    stored, labels = _stored_images(images["root"], "train")
    with torch.no_grad():
        expected = model.forward_features(stored, width)  # (10, 64)
        full = model.forward_features(stored)
    assert emb["embeddings"].shape == (10, 64) and emb["embeddings"].dtype == torch.float32
    torch.testing.assert_close(emb["embeddings"], expected)
    assert not torch.allclose(emb["embeddings"], full, atol=1e-3)  # the width was used
    assert torch.equal(emb["ids"], torch.arange(10)) and torch.equal(emb["labels"], labels)
    assert emb["width"] == model.config.resolve(width) and emb["feature"] == "pooled"
    assert emb["granularities"] == [64, 32, 16, 8] and emb["split"] == "train"


def test_embed_rejects_a_width_the_checkpoint_cannot_express(images, tmp_path, capsys):
    out = tmp_path / "x.pt"
    with pytest.raises(SystemExit) as done:
        main(["embed", "--ckpt_path", str(images["ckpt"]), "--width", "66", "--output", str(out)])
    assert done.value.code not in (0, None)
    message = str(done.value.code)
    assert (
        message.startswith("error: --width 66:")
        and "allowed widths are multiples of 4 from 4 to 64" in message
    )
    assert "\n" not in message and not out.exists() and not list(tmp_path.iterdir())


def test_embed_does_not_overwrite_and_leaves_nothing_on_failure(images, tmp_path, monkeypatch):
    out = tmp_path / "x.pt"
    out.write_text("keep me")
    with pytest.raises(SystemExit, match="already exists"):
        main(["embed", "--ckpt_path", str(images["ckpt"]), "--output", str(out)])

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lit_matmamba.embed.os.replace", broken)  # after the temporary file is written
    out2 = tmp_path / "y.pt"
    with pytest.raises(SystemExit, match="disk full"):
        main(["embed", "--ckpt_path", str(images["ckpt"]), "--output", str(out2), "--progress", "false"])
    assert out.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["x.pt"]


def test_text_embeddings_are_the_mean_or_last_position_of_the_lm_features(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from lit_matmamba.data.prepare_text import prepare_text
    from lit_matmamba.data.text import TextDataModule

    words = [f"w{i}" for i in range(1, 60)]
    tok = Tokenizer(
        models.WordLevel(
            {"<|endoftext|>": 0, **{w: i + 1 for i, w in enumerate(words)}, "[UNK]": 60}, unk_token="[UNK]"
        )
    )
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tok.json"))
    (tmp_path / "a.txt").write_text(" ".join(words * 2))
    prepare_text(
        tmp_path / "data",
        tmp_path / "tok.json",
        train=str(tmp_path / "a.txt"),
        val=str(tmp_path / "a.txt"),
        seq_len=8,
        sequences_per_shard=4,
        progress=False,
    )
    torch.manual_seed(0)
    dm = TextDataModule(str(tmp_path / "data"), seq_len=8, batch_size=3, num_workers=0)
    ckpt = _fit(LanguageModeling(MatMambaLM("lm-tiny")), dm, tmp_path)
    model = load_model(str(ckpt)).eval()
    val = torch.cat(
        list(
            TextDataModule(str(tmp_path / "data"), seq_len=8, batch_size=100, num_workers=0).dataloader("val")
        )
    )
    with torch.no_grad():
        feats = model.forward_features(val, 16)  # (N, 8, 64)
    for pool, expected in (("mean", feats.mean(1)), ("last", feats[:, -1])):
        out = tmp_path / f"{pool}.pt"
        main(
            [
                "embed",
                "--ckpt_path",
                str(ckpt),
                "--width",
                "16",
                "--pool",
                pool,
                "--output",
                str(out),
                "--progress",
                "false",
            ]
        )
        emb = torch.load(out)
        torch.testing.assert_close(emb["embeddings"], expected)
        assert torch.equal(emb["ids"], torch.arange(len(val))) and (emb["labels"] == -1).all()
        assert emb["feature"] == pool
    with pytest.raises(SystemExit, match="no labels"):
        main(["retrieval", "--queries", str(tmp_path / "mean.pt"), "--database", str(tmp_path / "last.pt")])


# --------------------------------------------------------------------------- retrieval command


def test_retrieval_grid_matches_pairs_of_embed_files_and_lands_in_tensorboard(images, tmp_path, capsys):
    ckpt = str(images["ckpt"])
    report = tmp_path / "table.json"
    main(["retrieval", "--ckpt_path", ckpt, "--k", "3", "--output", str(report), "--progress", "false"])
    table = json.loads(report.read_text())
    assert table["widths"] == ["64", "32", "16", "8"] and (table["queries"], table["database"]) == (7, 10)
    assert len(table["top1"]) == 4 and all(len(row) == 4 for row in table["map@3"])
    printed = capsys.readouterr().out
    assert "| top1: query \\ database | 64 | 32 | 16 | 8 |" in printed

    run = images["ckpt"].parent.parent  # the default log_dir: the checkpoint's run directory
    acc = EventAccumulator(str(run))
    acc.Reload()
    assert {"retrieval/top1", "retrieval/map@3"} <= set(acc.Tags()["images"])
    assert acc.Scalars("retrieval/map@3/q8_db64")[-1].value == pytest.approx(table["map@3"][3][0])

    for q, db in ((8, 64), (64, 32)):
        main(
            [
                "embed",
                "--ckpt_path",
                ckpt,
                "--width",
                str(q),
                "--output",
                str(tmp_path / f"q{q}.pt"),
                "--progress",
                "false",
            ]
        )
        main(
            [
                "embed",
                "--ckpt_path",
                ckpt,
                "--width",
                str(db),
                "--split",
                "train",
                "--output",
                str(tmp_path / f"db{db}.pt"),
                "--progress",
                "false",
            ]
        )
        pair = tmp_path / f"pair{q}_{db}.json"
        main(
            [
                "retrieval",
                "--queries",
                str(tmp_path / f"q{q}.pt"),
                "--database",
                str(tmp_path / f"db{db}.pt"),
                "--k",
                "3",
                "--output",
                str(pair),
            ]
        )
        got = json.loads(pair.read_text())
        i, j = table["widths"].index(str(q)), table["widths"].index(str(db))
        assert (got["top1"], got["map@3"]) == pytest.approx((table["top1"][i][j], table["map@3"][i][j]))


def test_retrieval_bad_input_is_one_line(images, tmp_path):
    q = {"embeddings": torch.randn(4, 8), "ids": torch.arange(4), "labels": torch.zeros(4, dtype=torch.long)}
    db = {
        "embeddings": torch.randn(5, 16),
        "ids": torch.arange(5),
        "labels": torch.zeros(5, dtype=torch.long),
    }
    torch.save(q, tmp_path / "q.pt")
    torch.save(db, tmp_path / "db.pt")
    (tmp_path / "junk.pt").write_text("not a tensor file")
    cases = [
        (["--queries", "q.pt", "--database", "db.pt"], "queries have 8 dimensions and the database 16"),
        (["--queries", "q.pt", "--database", "junk.pt"], "not an embedding file"),
        (["--queries", "q.pt"], "give both --queries and --database"),
        (["--ckpt_path", str(images["ckpt"]), "--widths", "[64, 30]"], "--widths 30: width 30 is not valid"),
        (["--ckpt_path", str(images["ckpt"]), "--database_split", "val"], "the same split"),
        ([], "give --ckpt_path, or --queries and --database"),
    ]
    for args, message in cases:
        args = [str(tmp_path / a) if a.endswith(".pt") else a for a in args]
        with pytest.raises(SystemExit) as done:
            main(["retrieval", *args, "--output", str(tmp_path / "out.json")])
        assert message in str(done.value.code) and "\n" not in str(done.value.code), args
    assert not (tmp_path / "out.json").exists()


def test_help_of_the_new_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "    embed  " in out and "    retrieval  " in out
    for command, words in (("embed", "pooled features"), ("retrieval", "mAP@k")):
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code in (0, None)
        assert "--ckpt_path" in (text := capsys.readouterr().out) and words in text


def test_heatmap_writes_every_value():
    from lit_matmamba.plots import heatmap

    fig = heatmap([[0.9, 0.5], [0.25, 0.125]], ["a", "b"], ["c", "d"], title="t")
    assert sorted(t.get_text() for t in fig.axes[0].texts) == ["0.125", "0.250", "0.500", "0.900"]
    with pytest.raises(ValueError, match="2 rows and 3 columns"):
        heatmap([[1, 2], [3, 4]], ["a", "b"], ["c", "d", "e"])


def test_search_faiss_without_faiss_says_what_to_install_before_embedding(images, monkeypatch, tmp_path):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "faiss" else find_spec(name, *a)
    )
    monkeypatch.setattr("lit_matmamba.retrieval.embed_split", None)  # embedding would fail differently
    with pytest.raises(SystemExit, match=r"pip install 'lit-matmamba\[retrieval\]'"):
        main(
            ["retrieval", "--ckpt_path", str(images["ckpt"]), "--search", "faiss", "--log_dir", str(tmp_path)]
        )
