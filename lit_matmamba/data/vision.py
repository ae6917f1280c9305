"""Image classification data: ImageNet-style folders or WebDataset shards, with the DeiT recipe.

``ImageDataModule`` reads either

* an image-folder tree ``<data_dir>/{train,val,test}/<class>/...`` (ImageNet layout), or
* a shard folder written by ``python main.py prepare images pack`` (``index.json`` +
  ``<split>-NNNNN.tar``), local or at any URL webdataset's ``gopen`` opens (``https://...``, or a
  ``pipe:`` template with ``{}`` for the file name; see :func:`~lit_matmamba.data.shards.locate`), or
* nothing (``data_dir=None``): Fashion-MNIST, built once from a Debian package (see ``fashion_mnist``).

Batches are ``(images, targets)``: images float32 (B, 3, img_size, img_size), normalised; targets
int64 class indices (B,) for val/test, and for train float32 soft targets (B, num_classes) summing
to 1 when MixUp, CutMix or label smoothing is on (the default), else class indices. Use
``F.cross_entropy(logits, targets)``, which takes both, and no label smoothing in the loss: it is
applied here.

Splitting over ranks and workers: for val/test every sample is read exactly once across all
ranks and workers (rank counts differ by at most one). For train, every rank gets
``ceil(N / world_size)`` samples, so that DDP ranks take the same number of steps; up to
``world_size - 1`` samples are then read twice per epoch, as with ``DistributedSampler``. With a
single rank, train also reads every sample exactly once.

Unreadable images: at read time an image that does not decode is an error naming the file (or
shard and key); nothing is skipped silently. ``prepare_images`` is where bad files are dropped
(with a warning, and listed in index.json) before training. A shard whose bytes do not have the
sha256 its index lists is an error naming the shard, raised the first time each dataloader worker
opens it (see :func:`~lit_matmamba.data.shards.open_checked`).
"""

from __future__ import annotations

import itertools
import math
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, default_collate
from torchvision.transforms import v2

from lit_matmamba.data.fashion_mnist import ensure_fashion_mnist
from lit_matmamba.data.prepare_images import (
    DEFAULT_SPLITS,
    UnreadableImageError,
    has_checksums,
    iter_shard,
    load_index,
    open_rgb,
    scan_image_folder,
    shard_checksums,
)
from lit_matmamba.data.shards import (
    INDEX_NAME,
    EpochLoader,
    SplitLoaders,
    check_shards_exist,
    data_sha256,
    is_url,
    locate,
    rank_and_world_size,
    warn_unverifiable,
)

# Lightning warns that an IterableDataset's __len__ may be wrong with several workers. Ours is
# exact: workers split each rank's share in whole batches (see ShardedImageDataset).
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Interpolation = Literal["bilinear", "bicubic", "nearest"]


# --------------------------------------------------------------------------- transforms


def train_transform(
    img_size: int = 224,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    interpolation: Interpolation = "bicubic",
    hflip: float = 0.5,
    randaugment_ops: int = 2,
    randaugment_magnitude: int = 9,
    randaugment_bins: int = 11,
    random_erasing: float = 0.25,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """DeiT training augmentation: RGB PIL image -> normalised float32 (3, img_size, img_size)."""
    mode = v2.InterpolationMode(interpolation)
    # ToImage first: v2 ops run faster on uint8 tensors than on PIL images.
    steps: list[v2.Transform] = [
        v2.ToImage(),
        v2.RandomResizedCrop(img_size, scale=scale, ratio=ratio, interpolation=mode, antialias=True),
    ]
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    if randaugment_ops > 0:
        steps.append(
            v2.RandAugment(
                num_ops=randaugment_ops, magnitude=randaugment_magnitude, num_magnitude_bins=randaugment_bins
            )
        )
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if random_erasing > 0:
        # value="random": erase with normal noise, timm's "pixel" mode that DeiT uses.
        steps.append(v2.RandomErasing(p=random_erasing, value="random"))
    steps.append(v2.ToPureTensor())
    return v2.Compose(steps)


def eval_transform(
    img_size: int = 224,
    *,
    crop_pct: float = 0.875,
    interpolation: Interpolation = "bicubic",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """Deterministic eval preprocessing: resize the short side to img_size / crop_pct, center crop."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(
                int(img_size / crop_pct), interpolation=v2.InterpolationMode(interpolation), antialias=True
            ),
            v2.CenterCrop(img_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
            v2.ToPureTensor(),
        ]
    )


def mix_transform(
    num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, cutmix_prob: float = 0.5
) -> v2.Transform | None:
    """Per-batch MixUp or CutMix (one of them per batch, CutMix with ``cutmix_prob``); None if both are off."""
    mixes = []
    if mixup_alpha > 0:
        mixes.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        mixes.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if len(mixes) == 2:
        return v2.RandomChoice(mixes, p=[1 - cutmix_prob, cutmix_prob])
    return mixes[0] if mixes else None


class SoftTargetCollate:
    """Collates ``(image, class)`` samples into images (B, 3, H, W) and soft targets (B, num_classes).

    Applies ``mix`` (from ``mix_transform``) to the batch, then label smoothing. Smoothing after
    mixing equals mixing smoothed one-hot targets (both are linear), which is what timm/DeiT do.
    """

    def __init__(self, num_classes: int, mix: v2.Transform | None, label_smoothing: float = 0.0):
        self.num_classes = num_classes
        self.mix = mix
        self.label_smoothing = label_smoothing

    def __call__(self, samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, ...]:
        # Fields after the target (the ids of ``with_ids``) pass through unchanged.
        images, targets, *rest = default_collate(samples)  # (B, 3, H, W) float, (B,) int64
        if self.mix is not None:
            images, soft = self.mix(images, targets)  # soft: (B, num_classes)
        else:
            soft = F.one_hot(targets, self.num_classes).float()
        return images, soft * (1 - self.label_smoothing) + self.label_smoothing / self.num_classes, *rest


# --------------------------------------------------------------------------- datasets


class ImageFolderDataset(Dataset):
    """Map-style dataset over ``(path, class index)`` pairs; with ``with_ids`` each item also has its
    index in ``samples``."""

    def __init__(self, samples: Sequence[tuple[Path, int]], transform: Callable, with_ids: bool = False):
        self.samples = list(samples)
        self.transform = transform
        self.with_ids = with_ids

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, cls = self.samples[index]
        try:
            data = path.read_bytes()
        except OSError as exn:
            raise UnreadableImageError(f"{path}: cannot read file ({exn})") from exn
        image = self.transform(open_rgb(data, str(path)))
        return (image, cls, index) if self.with_ids else (image, cls)


class ShardedImageDataset(IterableDataset):
    """Samples of WebDataset shards, split over distributed ranks and dataloader workers.

    Each epoch the shards are put in an order (seeded and reshuffled per epoch when ``train``,
    identical on all ranks) and their samples form one stream of N positions. Rank ``r`` takes a
    contiguous span of that stream (see the module docstring for train vs eval), and its span is
    cut between workers in whole batches of ``batch_size``, so only the last batch of a rank is
    short and ``len(DataLoader)`` is exact. A worker opens only the shards its span touches and
    skips, undecoded, the samples of a shard that belong to a neighbour. With ``train`` a buffer
    of ``shuffle_buffer`` encoded samples shuffles further.

    The epoch comes from ``set_position`` (shared memory, so persistent workers see it too). With
    ``with_ids`` each sample is ``(image, class, id)``, the id its position in the stored order
    (shards in index order), whatever order it is read in. With ``checksums`` (the sha256 of each
    shard, from the index) each worker checks each shard the first time it opens it.
    """

    def __init__(
        self,
        urls: Sequence[str],
        counts: Sequence[int],
        num_classes: int,
        transform: Callable,
        *,
        batch_size: int,
        train: bool,
        shuffle_buffer: int = 0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        with_ids: bool = False,
        checksums: Sequence[str | None] | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        self.urls = list(urls)
        self.counts = list(counts)
        self.checksums = list(checksums) if checksums is not None else [None] * len(self.urls)
        # Shards this process has checked; each worker has its own copy.
        self._verified: set[str] = set()
        self.with_ids = with_ids
        # The stored position of each shard's first sample.
        self.first_ids = [0, *itertools.accumulate(self.counts)][:-1]
        self.num_classes = num_classes
        self.transform = transform
        self.batch_size = batch_size
        self.train = train
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_samples = sum(self.counts)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_position(self, epoch: int, skip_batches: int = 0) -> None:
        """Iterate epoch ``epoch`` next; resuming inside an epoch (``skip_batches``) is not supported."""
        if skip_batches:
            raise ValueError("ShardedImageDataset starts epochs at their beginning only")
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        """Samples this rank reads per epoch."""
        return self._rank_span()[1]

    def _rank_span(self) -> tuple[int, int]:
        """(start, length) of this rank in the epoch stream; with ``train`` it may run past N and wrap."""
        n, r, w = self.num_samples, self.rank, self.world_size
        if self.train:
            length = math.ceil(n / w)
            return r * length, length
        start = n * r // w
        return start, n * (r + 1) // w - start

    def _worker_span(self, length: int, worker: int, workers: int) -> tuple[int, int]:
        batches = math.ceil(length / self.batch_size)
        first, last = batches * worker // workers, batches * (worker + 1) // workers
        return first * self.batch_size, min(last * self.batch_size, length)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = int(self._epoch)
        order = list(range(len(self.urls)))
        if self.train:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        start, length = self._rank_span()
        lo, hi = self._worker_span(length, worker, workers)
        samples = self._read(order, start + lo, start + hi)
        if self.train and self.shuffle_buffer > 1:
            rng = random.Random(f"{self.seed}:{epoch}:{self.rank}:{worker}")
            samples = _shuffled(samples, self.shuffle_buffer, rng)
        for source, data, cls, sample_id in samples:
            image = self.transform(open_rgb(data, source))
            yield (image, cls, sample_id) if self.with_ids else (image, cls)

    def _read(self, order: list[int], start: int, stop: int) -> Iterator[tuple[str, bytes, int, int]]:
        """Samples at stream positions [start, stop), wrapping around past the end of the stream."""
        while start < stop:
            begin = start % self.num_samples
            end = min(begin + stop - start, self.num_samples)
            yield from self._read_span(order, begin, end)
            start += end - begin

    def _read_span(self, order: list[int], begin: int, end: int) -> Iterator[tuple[str, bytes, int, int]]:
        offset = 0
        for shard in order:
            url, count = self.urls[shard], self.counts[shard]
            if offset < end and begin < offset + count:
                skip, take = max(begin - offset, 0), min(end - offset, count)
                samples = iter_shard(url, count, self.num_classes, self.checksums[shard], self._verified)
                for i, (key, data, cls) in enumerate(samples):
                    # Whoever reads a shard's last sample reads on to its end, so that iter_shard
                    # checks the shard's size against the index.
                    if i >= take and take < count:
                        break
                    if skip <= i < take:
                        yield f"{url}:{key}", data, cls, self.first_ids[shard] + i
            offset += count
            if offset >= end:
                break


def _shuffled(samples: Iterator, size: int, rng: random.Random) -> Iterator:
    buffer = []
    for sample in samples:
        buffer.append(sample)
        if len(buffer) >= size:
            i = rng.randrange(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


# --------------------------------------------------------------------------- data module


class ImageDataModule(SplitLoaders, L.LightningDataModule):
    """Image classification data (ImageNet folders, WebDataset shards, or Fashion-MNIST) with the DeiT recipe.

    Batches: ``(images, targets)``; images float32 (B, 3, img_size, img_size). Targets: class
    indices (B,) for val/test; for train soft targets (B, num_classes) summing to 1 when mixup,
    cutmix or label smoothing is on, else class indices. After ``setup()``: ``num_classes``,
    ``class_names``, ``img_size``.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 128,
        num_workers: int = 4,
        img_size: int = 224,
        crop_pct: float = 0.875,
        interpolation: Interpolation = "bicubic",
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        randaugment_ops: int = 2,
        randaugment_magnitude: int = 9,
        randaugment_bins: int = 11,
        random_erasing: float = 0.25,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        cutmix_prob: float = 0.5,
        label_smoothing: float = 0.1,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        shuffle_buffer: int = 1000,
        seed: int = 0,
    ):
        """
        Args:
            data_dir: An image-folder tree (``train/``, ``val/``, optional ``test/``, each with one
                folder per class), a shard folder made by ``python main.py prepare images pack``
                (``index.json`` + tars), its index.json, a URL to either, or a template with ``{}``
                for the file name (needed for ``pipe:``). None: Fashion-MNIST, built once under
                ``$LIT_MATMAMBA_DATA`` (default ``./data``) from the Debian package dataset-fashion-mnist.
            batch_size: Samples per batch on each device.
            num_workers: Data loader worker processes per device.
            img_size: Side of the square images the model gets.
            crop_pct: Eval: resize the short side to ``img_size / crop_pct``, then center crop ``img_size``.
            interpolation: Resampling of crops and resizes.
            scale: Train RandomResizedCrop area range (fraction of the image).
            ratio: Train RandomResizedCrop aspect-ratio range.
            hflip: Train horizontal flip probability (0: off).
            randaugment_ops: RandAugment ops per image (0: RandAugment off).
            randaugment_magnitude: RandAugment magnitude, in ``randaugment_bins - 1`` steps.
            randaugment_bins: RandAugment magnitude bins; 11 makes magnitude 9 mean 90% of the
                maximum, as timm's ``rand-m9`` in DeiT (torchvision's default of 31 gives 30%).
            random_erasing: Train RandomErasing probability (0: off); erases with normal noise.
            mixup_alpha: MixUp Beta(alpha, alpha) parameter (0: MixUp off).
            cutmix_alpha: CutMix Beta(alpha, alpha) parameter (0: CutMix off).
            cutmix_prob: When both are on, probability that a batch gets CutMix rather than MixUp.
            label_smoothing: Label smoothing of the train targets (applied here, not in the loss).
            mean: Per-channel normalisation mean (RGB, 0..1 scale).
            std: Per-channel normalisation std.
            shuffle_buffer: Shards only: samples each worker buffers to shuffle train data
                (shards are already shuffled when written; the shard order is reshuffled each epoch).
            seed: Seed of the train shard order, shuffle buffer and distributed sampler.
        """
        super().__init__()
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.img_size = img_size
        self.num_classes: int | None = None
        self.class_names: list[str] | None = None
        self._train_transform = train_transform(
            img_size,
            scale=scale,
            ratio=ratio,
            interpolation=interpolation,
            hflip=hflip,
            randaugment_ops=randaugment_ops,
            randaugment_magnitude=randaugment_magnitude,
            randaugment_bins=randaugment_bins,
            random_erasing=random_erasing,
            mean=mean,
            std=std,
        )
        self._eval_transform = eval_transform(
            img_size, crop_pct=crop_pct, interpolation=interpolation, mean=mean, std=std
        )
        self._where: str | None = None
        # Per split: ("shards", urls, counts, sha256s) or ("folder", [(path, class index)]).
        self._splits: dict[str, tuple] = {}

    def prepare_data(self) -> None:
        # Runs on one process per node before setup(): build the default data set there, once.
        if self.data_dir is None:
            ensure_fashion_mnist()

    def setup(self, stage: str | None = None) -> None:
        if self.class_names is None:
            self._load()
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage or "", ())
        for split in needed:
            self._split(split)

    def _load(self) -> None:
        data_dir = str(ensure_fashion_mnist()) if self.data_dir is None else self.data_dir
        local = None if is_url(data_dir) or "{}" in data_dir else Path(data_dir)
        if local is not None and not local.exists():
            raise FileNotFoundError(f"data_dir {data_dir} does not exist")
        if local is None or local.suffix == ".json" or (local / INDEX_NAME).is_file():
            index, self._where = load_index(data_dir)
            if not has_checksums(index):
                warn_unverifiable(self._where, "python main.py prepare images pack")
            class_names = index["class_names"]
            shard_path = locate(data_dir)
            for split, entry in index["splits"].items():
                urls = [shard_path(shard) for shard in entry["shards"]]
                check_shards_exist(urls, f"split {split!r} of {self._where}")
                self._splits[split] = ("shards", urls, entry["counts"], shard_checksums(index, split))
        elif any((local / split).is_dir() for split in DEFAULT_SPLITS):
            self._where = str(local)
            class_names, samples = scan_image_folder(local)
            for split, items in samples.items():
                self._splits[split] = ("folder", [(local / rel, cls) for rel, cls in items])
        else:
            raise FileNotFoundError(
                f"data_dir {data_dir}: neither a shard folder ({INDEX_NAME}) nor an image folder "
                f"(with {'/, '.join(DEFAULT_SPLITS)}/ inside)"
            )
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)

    def _split(self, split: str) -> tuple:
        if split not in self._splits:
            raise ValueError(f"{self._where}: no {split!r} split (found: {', '.join(sorted(self._splits))})")
        return self._splits[split]

    @property
    def data_sha256(self) -> str | None:
        """sha256 of the shards' sha256 (``shards.data_sha256``); None for an image folder or an
        index without them."""
        if self.class_names is None:
            self._load()
        splits = self._splits.values()
        if not splits or any(entry[0] != "shards" for entry in splits):
            return None
        return data_sha256({split: entry[3] for split, entry in self._splits.items()})

    def check_num_classes(self, num_classes: int) -> None:
        """Raises ValueError when a model head with ``num_classes`` outputs does not fit this data."""
        if self.num_classes is None:
            self._load()
        if num_classes != self.num_classes:
            shown = ", ".join(self.class_names[:5]) + (", ..." if self.num_classes > 5 else "")
            raise ValueError(
                f"the model head has {num_classes} classes but the data at {self._where} has "
                f"{self.num_classes} ({shown}); set the model's num_classes to {self.num_classes}"
            )

    @property
    def soft_train_targets(self) -> bool:
        """Whether train batches carry soft targets (B, num_classes) rather than class indices (B,)."""
        hp = self.hparams
        return hp.mixup_alpha > 0 or hp.cutmix_alpha > 0 or hp.label_smoothing > 0

    def dataloader(
        self,
        split: str,
        rank: int | None = None,
        world_size: int | None = None,
        *,
        mode: Literal["train", "eval"] | None = None,
        with_ids: bool = False,
    ) -> DataLoader:
        """The loader of any split.

        Args:
            split: "train", "val", "test" or another split of the data.
            rank: This rank; default the trainer's, else torch.distributed's, else 0.
            world_size: Number of ranks; default the trainer's, else torch.distributed's, else 1.
            mode: "train" (augmented, shuffled, ranks padded to equal length, targets as
                configured) or "eval" (eval transform, stored order, every sample read once,
                class indices); None: "train" for the train split, "eval" for the others.
                Embeddings of the train split read it in "eval" mode.
            with_ids: batches are ``(images, targets, ids)``, ``ids`` int64 (B,): each sample's
                position in its split's stored order (shards in index order, or the sorted file
                list of a folder), the same in every mode and with any number of workers.
        """
        if self.num_classes is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        if rank is None or world_size is None:
            rank, world_size = rank_and_world_size(self.trainer)
        if mode not in (None, "train", "eval"):
            raise ValueError(f"mode must be 'train', 'eval' or None, got {mode!r}")
        train = (mode or ("train" if split == "train" else "eval")) == "train"
        hp = self.hparams
        collate = None
        if train and self.soft_train_targets:
            mix = mix_transform(self.num_classes, hp.mixup_alpha, hp.cutmix_alpha, hp.cutmix_prob)
            collate = SoftTargetCollate(self.num_classes, mix, hp.label_smoothing)
        loader_args = dict(
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )
        kind, *source = self._split(split)
        transform = self._train_transform if train else self._eval_transform
        if kind == "shards":
            urls, counts, checksums = source
            dataset = ShardedImageDataset(
                urls,
                counts,
                self.num_classes,
                transform,
                batch_size=self.batch_size,
                train=train,
                shuffle_buffer=hp.shuffle_buffer,
                seed=hp.seed,
                rank=rank,
                world_size=world_size,
                with_ids=with_ids,
                checksums=checksums,
            )
            return EpochLoader(dataset, self._trainer_position, **loader_args)
        dataset = ImageFolderDataset(source[0], transform, with_ids=with_ids)
        if world_size == 1:
            return DataLoader(dataset, shuffle=train, **loader_args)
        # Our own samplers, which Lightning keeps (it replaces only non-distributed ones) and calls
        # set_epoch on: train pads ranks to equal length, eval reads each sample exactly once.
        sampler_type = DistributedSampler if train else UnrepeatedDistributedSampler
        sampler = sampler_type(dataset, num_replicas=world_size, rank=rank, shuffle=train, seed=hp.seed)
        return DataLoader(dataset, sampler=sampler, **loader_args)

    def _trainer_position(self) -> tuple[int, int] | None:
        """The trainer's epoch, from its start; None without a trainer.

        Following the trainer's epoch makes a resumed fit, or dataloaders reloaded every epoch, continue
        the sequence of shard orders. A fit resumed mid-epoch starts that epoch again from its beginning.
        """
        return None if self.trainer is None else (self.trainer.current_epoch, 0)
