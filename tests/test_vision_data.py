"""Image data: packing shards, the DataModule on folders and shards, transforms, bad inputs, Fashion-MNIST.

Test images are uniform colours whose red value 8k+4 identifies sample k, so a sample can be
recognised after decoding, resizing, cropping and flipping (all of which keep a uniform image
uniform). Augmentations that change colours are switched off where samples are identified.
"""

from __future__ import annotations

import gc
import gzip
import io
import json
import multiprocessing
import shutil
import socket
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

from lit_matmamba.data import fashion_mnist, prepare_images
from lit_matmamba.data.prepare_images import (
    ShardError,
    UnreadableImageError,
    iter_shard,
    load_index,
    open_rgb,
    verify_shards,
    write_shards,
)
from lit_matmamba.data.prepare_images import prepare_images as pack
from lit_matmamba.data.vision import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDataModule,
    SoftTargetCollate,
    eval_transform,
    mix_transform,
    train_transform,
)

CLASSES = ("cat", "dog", "eel")
# Every input kind the pipeline must handle, cycled over the samples.
KINDS = ("RGB.jpg", "L.png", "RGBA.png", "P.png", "CMYK.jpg", "RGB.png", "LA.png")
SIZES = ((12, 9), (9, 12), (16, 16), (7, 20))
# Everything that changes colours off, so samples stay identifiable.
PLAIN = dict(randaugment_ops=0, random_erasing=0.0, mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.0)


@pytest.fixture(autouse=True)
def _collect_loaders():
    """Shuts down each test's persistent DataLoader workers before the next test starts its own.

    Loaders kept alive by a reference cycle (pytest can hold a test's frame) are only freed by the
    cycle collector; if that happens after other workers were forked, torch's shutdown can miss a
    worker and wait 5 s for it.
    """
    yield
    gc.collect()


def make_tree(
    root: Path, counts: dict[str, int], kinds: tuple[str, ...] = KINDS
) -> dict[int, tuple[str, int, Path]]:
    """Writes ``root/<split>/<class>/img<k>.<ext>``; returns sample id k -> (split, class index, path)."""
    samples = {}
    k = 0
    for split, n in counts.items():
        for j in range(n):
            cls = j % len(CLASSES)
            mode, ext = kinds[k % len(kinds)].split(".")
            red = 8 * k + 4
            image = Image.new("RGB", SIZES[k % len(SIZES)], (red, 255 - red, 77))
            if mode == "L":
                image = Image.new("L", image.size, red)
            elif mode == "LA":
                image = Image.new("LA", image.size, (red, 255))
            elif mode == "P":
                image = image.convert("P", palette=Image.Palette.ADAPTIVE)
            else:
                image = image.convert(mode)
            path = root / split / CLASSES[cls] / f"img{k:03d}.{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path, quality=95)  # quality: JPEG only, ignored for PNG
            samples[k] = (split, cls, path)
            k += 1
    assert k <= 32, "red values 8k+4 must stay below 256"
    return samples


def identify(loader) -> list[tuple[int, int]]:
    """(sample id, class) of every sample a loader yields, from the red value of its uniform image."""
    found = []
    for images, targets in loader:  # (B, 3, H, W) normalised, (B,)
        red = (images[:, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]).mean(dim=(1, 2)) * 255  # (B,)
        assert torch.allclose(images[:, 0], images[:, 0, :1, :1], atol=0.05), "image not uniform"
        found += zip(((red - 4) / 8).round().long().tolist(), targets.tolist())
    return found


def expected(samples: dict[int, tuple[str, int, Path]], split: str) -> list[tuple[int, int]]:
    return sorted((k, cls) for k, (s, cls, _) in samples.items() if s == split)


def no_leftovers(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------- prepare + round trip


@pytest.mark.parametrize("layout", ["shards", "folder"])
def test_round_trip_every_sample_once_with_its_label(tmp_path, layout):
    samples = make_tree(tmp_path / "src", {"train": 14, "val": 10, "test": 7})
    (tmp_path / "src/train/cat/notes.txt").write_text("not an image, ignored")
    data_dir = tmp_path / "src"
    if layout == "shards":
        index = pack(tmp_path / "src", tmp_path / "shards", samples_per_shard=4)
        assert index["class_names"] == list(CLASSES)
        assert [index["splits"][s]["num_samples"] for s in ("train", "val", "test")] == [14, 10, 7]
        assert index["splits"]["val"]["counts"] == [4, 4, 2]
        assert index["splits"]["train"]["class_counts"] == [5, 5, 4]
        data_dir = tmp_path / "shards"
    dm = ImageDataModule(str(data_dir), batch_size=3, num_workers=0, img_size=8, **PLAIN)
    dm.setup("fit")
    assert (dm.num_classes, dm.class_names, dm.img_size) == (3, list(CLASSES), 8)
    for split in ("train", "val", "test"):
        loader = dm.dataloader(split)
        found = identify(loader)
        assert sorted(found) == expected(samples, split), split
        assert len(loader) == -(-len(found) // 3)


def test_shards_read_through_a_url(tmp_path):
    samples = make_tree(tmp_path / "src", {"train": 4, "val": 5})
    pack(tmp_path / "src", tmp_path / "out", samples_per_shard=2)
    for url in (f"file://{tmp_path}/out", f"pipe:cat {tmp_path}/out/{{}}"):
        dm = ImageDataModule(url, batch_size=2, num_workers=0, img_size=8, **PLAIN)
        dm.setup("validate")
        assert sorted(identify(dm.val_dataloader())) == expected(samples, "val")


def test_shards_hold_the_original_bytes(tmp_path):
    samples = make_tree(tmp_path / "src", {"train": 9})
    pack(tmp_path / "src", tmp_path / "out", samples_per_shard=2)
    index, where = load_index(tmp_path / "out")
    entry = index["splits"]["train"]
    stored = []
    for shard, count in zip(entry["shards"], entry["counts"]):
        stored += [(data, cls) for _, data, cls in iter_shard(str(tmp_path / "out" / shard), count, 3)]
    originals = [(path.read_bytes(), cls) for _, cls, path in samples.values()]
    assert sorted(stored) == sorted(originals)
    verify_shards(tmp_path / "out", decode=True)


def test_prepare_is_deterministic_and_parallel_matches(tmp_path):
    make_tree(tmp_path / "src", {"train": 8, "val": 5})
    pack(tmp_path / "src", tmp_path / "a", samples_per_shard=3)
    pack(tmp_path / "src", tmp_path / "b", samples_per_shard=3, num_workers=2)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert "train-00002.tar" in names and "val-00001.tar" in names
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    # Shards mix classes (shuffled before sharding) rather than holding one class each.
    first = [cls for _, _, cls in iter_shard(str(tmp_path / "a/train-00000.tar"), 3, 3)]
    assert len(set(first)) > 1


def test_prepare_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    make_tree(tmp_path / "src", {"train": 6, "val": 6})
    out = tmp_path / "out" / "shards"
    calls = 0
    real_add = prepare_images.add_member

    def failing_add(tar, name, data):
        nonlocal calls
        calls += 1
        if calls == 15:  # in the second split, after train's shards were written
            raise OSError("disk full")
        real_add(tar, name, data)

    monkeypatch.setattr(prepare_images, "add_member", failing_add)
    with pytest.raises(OSError, match="disk full"):
        pack(tmp_path / "src", out, samples_per_shard=2)
    assert not out.exists() and no_leftovers(out.parent)

    # A failed overwrite keeps the previous output.
    monkeypatch.setattr(prepare_images, "add_member", real_add)
    pack(tmp_path / "src", out, samples_per_shard=2)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(prepare_images, "add_member", failing_add)
    calls = 0
    with pytest.raises(OSError, match="disk full"):
        pack(tmp_path / "src", out, samples_per_shard=5, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and no_leftovers(out.parent)
    with pytest.raises(FileExistsError, match="overwrite"):
        pack(tmp_path / "src", out)


def test_corrupt_images_skipped_with_warning_or_fatal_when_strict(tmp_path):
    samples = make_tree(tmp_path / "src", {"train": 9, "val": 4})
    bad = tmp_path / "src/train/dog/broken.jpg"
    bad.write_bytes(samples[0][2].read_bytes()[:40])  # truncated JPEG
    with pytest.raises(UnreadableImageError, match="broken.jpg"):
        pack(tmp_path / "src", tmp_path / "strict", strict=True)
    assert not (tmp_path / "strict").exists() and no_leftovers(tmp_path)

    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image\(s\): train/dog/broken.jpg"):
        index = pack(tmp_path / "src", tmp_path / "out", samples_per_shard=4)
    assert index["splits"]["train"]["skipped"] == ["train/dog/broken.jpg"]
    assert index["splits"]["train"]["num_samples"] == 9
    dm = ImageDataModule(str(tmp_path / "out"), batch_size=4, num_workers=0, img_size=8, **PLAIN)
    dm.setup("fit")
    assert sorted(identify(dm.dataloader("train"))) == expected(samples, "train")

    # Reading the folder directly fails on the bad file, naming it.
    dm = ImageDataModule(str(tmp_path / "src"), batch_size=4, num_workers=0, img_size=8, **PLAIN)
    dm.setup("fit")
    with pytest.raises(UnreadableImageError, match="broken.jpg"):
        identify(dm.dataloader("train"))


# --------------------------------------------------------------------------- transforms


def test_train_batches_have_soft_targets_that_sum_to_one(tmp_path):
    make_tree(tmp_path / "src", {"train": 10, "val": 3})
    pack(tmp_path / "src", tmp_path / "out")
    dm = ImageDataModule(str(tmp_path / "out"), batch_size=5, num_workers=0, img_size=16)
    dm.setup("fit")
    for images, targets in dm.train_dataloader():
        assert images.shape == (5, 3, 16, 16) and images.dtype == torch.float32
        assert targets.shape == (5, 3) and targets.dtype == torch.float32
        torch.testing.assert_close(targets.sum(dim=1), torch.ones(5))
        # Label smoothing 0.1 over 3 classes: no target below 0.1 / 3.
        assert targets.min() >= 0.1 / 3 - 1e-6
    images, targets = next(iter(dm.val_dataloader()))
    assert images.shape == (3, 3, 16, 16) and targets.dtype == torch.int64 and targets.shape == (3,)


def test_soft_target_collate_smooths_and_mixes():
    samples = [(torch.full((3, 4, 4), float(i)), i) for i in range(4)]
    images, targets = SoftTargetCollate(4, None, 0.2)(samples)
    assert images.shape == (4, 3, 4, 4)
    torch.testing.assert_close(targets, torch.eye(4) * 0.8 + 0.05)

    torch.manual_seed(0)
    images, targets = SoftTargetCollate(4, mix_transform(4), 0.0)(samples)  # (4, 3, 4, 4), (4, 4)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(4))
    assert targets.max() < 1  # mixed: no sample keeps its one-hot target
    assert mix_transform(4, mixup_alpha=0.0, cutmix_alpha=0.0) is None


def test_train_transform_output_and_eval_transform_deterministic():
    image = Image.new("RGB", (40, 20), (10, 200, 30))
    out = train_transform(16)(image)
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32 and type(out) is torch.Tensor

    noisy = Image.frombytes("RGB", (40, 20), bytes(range(256)) * 9 + bytes(96))
    evaluate = eval_transform(16, crop_pct=0.5)
    torch.testing.assert_close(evaluate(noisy), evaluate(noisy), rtol=0, atol=0)
    assert evaluate(noisy).shape == (3, 16, 16)
    # Normalisation uses the given mean/std: an image of the mean colour becomes zeros.
    mean_image = Image.new("RGB", (20, 30), tuple(round(m * 255) for m in IMAGENET_MEAN))
    assert evaluate(mean_image).abs().max() < 0.01
    gray = eval_transform(8, mean=(0.5,) * 3, std=(0.5,) * 3)(Image.new("L", (8, 8), 255).convert("RGB"))
    torch.testing.assert_close(gray, torch.ones(3, 8, 8))


def test_transparent_pixels_become_white_and_gray_becomes_rgb():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    decoded = open_rgb(buffer.getvalue(), "x.png")
    assert decoded.mode == "RGB" and decoded.getpixel((0, 0)) == (255, 255, 255)
    buffer = io.BytesIO()
    Image.new("L", (3, 5), 9).save(buffer, format="PNG")
    decoded = open_rgb(buffer.getvalue(), "g.png")
    assert decoded.mode == "RGB" and decoded.size == (3, 5) and decoded.getpixel((2, 4)) == (9, 9, 9)


# --------------------------------------------------------------------------- ranks x workers


@pytest.mark.parametrize("layout", ["shards", "folder"])
def test_two_ranks_two_workers_cover_every_sample_once(tmp_path, layout):
    samples = make_tree(tmp_path / "src", {"train": 13, "val": 19}, kinds=("RGB.png",))
    data_dir = tmp_path / "src"
    if layout == "shards":
        pack(tmp_path / "src", tmp_path / "out", samples_per_shard=4)  # shards of 4,4,4,4,3
        data_dir = tmp_path / "out"
    dm = ImageDataModule(str(data_dir), batch_size=3, num_workers=2, img_size=8, **PLAIN)
    dm.setup("fit")

    val = {rank: identify(dm.dataloader("val", rank=rank, world_size=2)) for rank in (0, 1)}
    assert sorted(val[0] + val[1]) == expected(samples, "val")  # exactly once each
    assert sorted(len(v) for v in val.values()) == [9, 10]

    for _ in range(2):  # two epochs
        loaders = [dm.dataloader("train", rank=rank, world_size=2) for rank in (0, 1)]
        train = [identify(loader) for loader in loaders]
        # Ranks take equal steps: 13 samples -> 7 each, one sample read twice.
        assert [len(t) for t in train] == [7, 7]
        assert [len(loader) for loader in loaders] == [3, 3]
        counts = Counter(train[0] + train[1])
        assert sorted(counts) == expected(samples, "train")
        assert sorted(counts.values()) == [1] * 12 + [2]


def test_shard_order_changes_between_epochs(tmp_path):
    make_tree(tmp_path / "src", {"train": 24}, kinds=("RGB.png",))
    pack(tmp_path / "src", tmp_path / "out", samples_per_shard=3)
    dm = ImageDataModule(
        str(tmp_path / "out"), batch_size=4, num_workers=2, img_size=8, shuffle_buffer=4, **PLAIN
    )
    dm.setup()
    loader = dm.train_dataloader()  # persistent workers: the epoch reaches them through shared memory
    epochs = [identify(loader) for _ in range(3)]
    assert all(sorted(e) == sorted(epochs[0]) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3


def _ddp_rank(rank: int, port: int, data_dir: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        dm = ImageDataModule(data_dir, batch_size=3, num_workers=2, img_size=8, **PLAIN)
        dm.setup("fit")
        results.put((rank, identify(dm.val_dataloader()), identify(dm.train_dataloader())))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_ranks_come_from_torch_distributed(tmp_path):
    samples = make_tree(tmp_path / "src", {"train": 9, "val": 11}, kinds=("RGB.png",))
    pack(tmp_path / "src", tmp_path / "out", samples_per_shard=4)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    ranks = [
        context.Process(target=_ddp_rank, args=(r, port, str(tmp_path / "out"), results)) for r in (0, 1)
    ]
    for process in ranks:
        process.start()
    found = dict((rank, (val, train)) for rank, val, train in (results.get(timeout=60) for _ in ranks))
    for process in ranks:
        process.join(timeout=30)
        assert process.exitcode == 0
    assert sorted(found[0][0] + found[1][0]) == expected(samples, "val")
    assert len(found[0][1]) == len(found[1][1]) == 5
    assert sorted(set(found[0][1] + found[1][1])) == expected(samples, "train")


class _TinyClassifier(L.LightningModule):
    """Records which samples each training epoch saw, in order."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.head = torch.nn.Linear(3, num_classes)
        self.seen: dict[int, list[tuple[int, int]]] = {}

    def training_step(self, batch, batch_idx):
        images, targets = batch  # (B, 3, H, W), (B,) with PLAIN augmentation
        self.seen.setdefault(self.current_epoch, []).extend(identify([batch]))
        return F.cross_entropy(self.head(images.mean(dim=(2, 3))), targets)

    def validation_step(self, batch, batch_idx):
        images, targets = batch  # (B, 3, H, W), (B,)
        self.log("val_loss", F.cross_entropy(self.head(images.mean(dim=(2, 3))), targets))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_trainer_reshuffles_shards_every_epoch(tmp_path):
    samples = make_tree(tmp_path / "src", {"train": 11, "val": 5}, kinds=("RGB.png",))
    pack(tmp_path / "src", tmp_path / "out", samples_per_shard=2)
    dm = ImageDataModule(
        str(tmp_path / "out"), batch_size=4, num_workers=2, img_size=8, shuffle_buffer=1, **PLAIN
    )
    model = _TinyClassifier(3)
    # A new train loader every epoch: the shard order must still change, following the trainer's epoch.
    trainer = L.Trainer(
        max_epochs=3,
        reload_dataloaders_every_n_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(model, datamodule=dm)
    assert trainer.num_training_batches == 3 and "val_loss" in trainer.callback_metrics
    assert all(sorted(seen) == expected(samples, "train") for seen in model.seen.values())
    assert len({tuple(seen) for seen in model.seen.values()}) == 3


# --------------------------------------------------------------------------- bad inputs


def test_empty_split_and_bad_data_dir(tmp_path):
    make_tree(tmp_path / "src", {"train": 3})
    (tmp_path / "src/val/cat").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"src/val: empty split"):
        pack(tmp_path / "src", tmp_path / "out")
    with pytest.raises(ValueError, match=r"src/val: empty split"):
        ImageDataModule(str(tmp_path / "src")).setup("fit")
    shutil.rmtree(tmp_path / "src/val")
    with pytest.raises(ValueError, match="no 'val' split"):
        ImageDataModule(str(tmp_path / "src")).setup("fit")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageDataModule(str(tmp_path / "nowhere")).setup()
    with pytest.raises(FileNotFoundError, match="neither a shard folder"):
        ImageDataModule(str(tmp_path / "src/train")).setup()


def test_check_num_classes(tmp_path):
    make_tree(tmp_path / "src", {"train": 3, "val": 3})
    dm = ImageDataModule(str(tmp_path / "src"))
    dm.check_num_classes(3)  # reads the class list itself when setup() has not run yet
    with pytest.raises(
        ValueError, match=r"model head has 1000 classes but the data .* has 3 \(cat, dog, eel\)"
    ):
        dm.check_num_classes(1000)


def _edit_index(out: Path, edit) -> None:
    index = json.loads((out / "index.json").read_text())
    edit(index)
    (out / "index.json").write_text(json.dumps(index))


def test_shards_that_disagree_with_their_index(tmp_path):
    make_tree(tmp_path / "src", {"train": 7, "val": 3})
    pack(tmp_path / "src", tmp_path / "out", samples_per_shard=4)
    saved = (tmp_path / "out/index.json").read_text()

    def fewer(index):  # index claims shard 0 holds 3 samples; it holds 4
        train = index["splits"]["train"]
        train["counts"][0] -= 1
        train["num_samples"] -= 1
        train["class_counts"][0] -= 1

    _edit_index(tmp_path / "out", fewer)
    dm = ImageDataModule(str(tmp_path / "out"), batch_size=2, num_workers=0, img_size=8, **PLAIN)
    dm.setup("fit")
    with pytest.raises(ShardError, match=r"train-00000.tar: holds 4 samples but the index says 3"):
        identify(dm.dataloader("train"))
    with pytest.raises(ShardError, match="train-00000.tar: holds 4"):
        verify_shards(tmp_path / "out")

    (tmp_path / "out/index.json").write_text(saved)
    _edit_index(tmp_path / "out", lambda index: index["splits"]["train"]["class_counts"].reverse())
    with pytest.raises(ShardError, match=r"split 'train': class counts differ .* cat: 3 \(index 2\)"):
        verify_shards(tmp_path / "out")

    _edit_index(tmp_path / "out", lambda index: index["splits"]["val"].update(num_samples=99))
    with pytest.raises(ShardError, match="split 'val' is inconsistent: num_samples 99"):
        ImageDataModule(str(tmp_path / "out")).setup()

    (tmp_path / "out/index.json").write_text(saved)
    (tmp_path / "out/train-00001.tar").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"split 'train' .* 1 shard\(s\) .* not found: .*train-00001.tar"
    ):
        ImageDataModule(str(tmp_path / "out")).setup()


def test_bad_samples_inside_shards(tmp_path):
    good = Image.new("RGB", (4, 4))
    buffer = io.BytesIO()
    good.save(buffer, format="PNG")
    loads = {"ok.png": (buffer.getvalue(), "png"), "bad.png": (b"garbage", "png")}
    # write_shards trusts its loader, so this shard holds an undecodable image.
    write_shards(tmp_path / "out", ["a", "b"], {"train": [("ok.png", 0), ("bad.png", 1)]}, loads.__getitem__)
    dm = ImageDataModule(str(tmp_path / "out"), batch_size=2, num_workers=0, img_size=4, **PLAIN)
    dm.setup()
    with pytest.raises(UnreadableImageError, match=r"train-00000.tar:train-0000000\d: cannot decode"):
        identify(dm.dataloader("train"))

    # A shard whose class index is outside the index's class list.
    write_shards(tmp_path / "out2", ["a", "b", "c"], {"val": [("ok.png", 2)]}, loads.__getitem__)

    def two_classes(index):
        index["class_names"] = ["a", "b"]
        index["splits"]["val"]["class_counts"] = [0, 1]

    _edit_index(tmp_path / "out2", two_classes)
    with pytest.raises(ShardError, match=r"val-00000.tar: sample 'val-00000000' has class 2, outside 0..1"):
        verify_shards(tmp_path / "out2")


def test_datamodule_arguments_documented_for_the_cli():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(ImageDataModule, "data")
    help_text = parser.format_help()
    assert "crop_pct" in help_text and "center crop" in help_text
    config = parser.parse_args(["--data.data_dir", "x", "--data.mean", "[0.5, 0.5, 0.5]"])
    assert config.data.mean == (0.5, 0.5, 0.5) and config.data.mixup_alpha == 0.8


# --------------------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_without_apt_explains_the_manual_route(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "PACKAGE_DIR", "nonexistent/fashion-mnist")
    monkeypatch.setattr(fashion_mnist.shutil, "which", lambda name: None)
    with pytest.raises(
        RuntimeError, match=r"apt-get not found.*apt-get install dataset-fashion-mnist.*fashion-mnist-idx"
    ):
        fashion_mnist.ensure_fashion_mnist(tmp_path)
    assert not (tmp_path / "fashion-mnist").exists() and no_leftovers(tmp_path)


def test_read_idx(tmp_path):
    header = bytes([0, 0, 0x08, 3]) + (2).to_bytes(4, "big") + (2).to_bytes(4, "big") + (3).to_bytes(4, "big")
    (tmp_path / "x.gz").write_bytes(gzip.compress(header + bytes(range(12))))
    array = fashion_mnist._read_idx(tmp_path / "x.gz")
    assert array.shape == (2, 2, 3) and array[1, 1, 2] == 11
    (tmp_path / "y").write_bytes(header + bytes(5))
    with pytest.raises(ValueError, match="shape"):
        fashion_mnist._read_idx(tmp_path / "y")


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("apt-get") is None, reason="needs apt-get (Debian) to fetch dataset-fashion-mnist"
)
def test_fashion_mnist_default(tmp_path, monkeypatch):
    monkeypatch.setenv("LIT_MATMAMBA_DATA", str(tmp_path))
    dm = ImageDataModule(batch_size=16, num_workers=0, img_size=28)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.num_classes == 10 and dm.class_names[0] == "T-shirt/top" and dm.class_names[9] == "Ankle boot"
    index, _ = load_index(tmp_path / "fashion-mnist")
    sizes = {split: entry["num_samples"] for split, entry in index["splits"].items()}
    assert sizes == {"train": 55_000, "val": 5_000, "test": 10_000}
    assert (
        sum(index["splits"]["test"]["class_counts"]) == 10_000
        and len(set(index["splits"]["test"]["class_counts"])) == 1
    )
    images, targets = next(iter(dm.train_dataloader()))
    assert images.shape == (16, 3, 28, 28) and targets.shape == (16, 10)
    images, targets = next(iter(dm.dataloader("test")))
    assert images.shape == (16, 3, 28, 28) and targets.max() < 10
    assert no_leftovers(tmp_path)
    # Built once: a second call reuses it.
    mtime = (tmp_path / "fashion-mnist/index.json").stat().st_mtime_ns
    assert fashion_mnist.ensure_fashion_mnist(tmp_path) == tmp_path / "fashion-mnist"
    assert (tmp_path / "fashion-mnist/index.json").stat().st_mtime_ns == mtime
