"""Pack an image-folder tree into WebDataset tar shards, and read such shards back.

Input layout (ImageNet's, after the usual val re-foldering)::

    <src>/<split>/<class>/.../<file>        e.g. train/n01440764/n01440764_10026.JPEG

Output layout::

    <output_dir>/index.json
    <output_dir>/<split>-00000.tar, <split>-00001.tar, ...

Each sample of a shard is two tar members: ``<key>.<ext>``, the original encoded image bytes
(``ext`` is the format found by decoding, so a PNG named ``.JPEG`` is stored as ``.png``), and
``<key>.cls``, the class index as ASCII digits. Keys are ``<split>-<8-digit position>``: unique
and, like the rest of the output, a function of the input tree and ``seed`` only. Samples are
shuffled (seeded) before sharding so that every shard mixes all classes; reading shards in order
with a small shuffle buffer then gives well-mixed batches.

``index.json`` (``INDEX_VERSION`` 1)::

    {
      "format": "lit-matmamba-image-shards",
      "version": 1,
      "class_names": ["n01440764", ...],          # class index i is class_names[i]
      "splits": {
        "train": {
          "num_samples": 1281167,
          "shards": ["train-00000.tar", ...],     # relative to the index's location
          "counts": [1000, ...],                  # samples per shard, same order
          "sha256": ["9f86d0...", ...],           # of each shard file, same order
          "class_counts": [1300, ...],            # samples per class, class-index order
          "skipped": ["train/n0.../x.JPEG", ...]  # unreadable inputs left out (see below)
        },
        ...
      }
    }

Unreadable images: an input that Pillow cannot fully decode is left out of the shards with a
warning naming it, and listed under ``skipped``; ``strict=True`` (``--strict true``) makes it an
error instead. Leaving a sample out removes its image and its label together, so no image ever
gets another one's label. Readers (``iter_shard``, the DataModule) treat an undecodable image or
a shard that disagrees with the index as an error naming the shard.

Damaged shards: each shard is checked against its ``sha256`` the first time a reader (each data
loader worker, ``verify``) opens it, with an error naming the shard (see
:func:`~lit_matmamba.data.shards.open_checked`). An index without ``sha256`` (written by an older
lit-matmamba) is still read, with a warning that its shards cannot be checked.

Writing is atomic: everything goes into a temporary folder next to ``output_dir``, renamed into
place at the end, so an interrupted or terminated run leaves nothing behind, and the next run
removes what a killed one left (see :func:`~lit_matmamba.data.shards.publishing`). Re-running on the same tree gives
byte-identical files (sorted inputs, seeded shuffle, fixed tar metadata).
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import multiprocessing
import os
import random
import sys
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from PIL import Image
from tqdm import tqdm
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from lit_matmamba.data.shards import (
    INDEX_NAME,
    ShardError,
    add_member,
    file_sha256,
    listing,
    locate,
    open_checked,
    open_shard,
    publishing,
    read_index,
    shard_name,
    warn_unverifiable,
)

INDEX_FORMAT = "lit-matmamba-image-shards"
INDEX_VERSION = 1
DEFAULT_SPLITS = ("train", "val", "test")
# File suffixes taken as images when scanning a folder (others, e.g. README or .DS_Store, are ignored).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
# Tar member suffixes taken as the image of a sample when reading shards (also ones made elsewhere).
_SHARD_IMAGE_EXTS = frozenset(s.lstrip(".") for s in IMAGE_SUFFIXES) | {"img"}


class UnreadableImageError(ValueError):
    """An image that cannot be decoded; the message names it."""


# --------------------------------------------------------------------------- decoding


def open_rgb(data: bytes, source: str) -> Image.Image:
    """Fully decodes ``data`` into an RGB image; ``source`` names it in the error.

    Grayscale, palette and CMYK images are converted to RGB; images with transparency are laid on
    white, because the colour under a transparent pixel is arbitrary (often black) and would
    otherwise show.
    """
    with _decoded(data, source) as image:
        if not (image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info):
            return image.convert("RGB")
        rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _decoded(data: bytes, source: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        # load() decodes everything: a truncated file fails here, not later in a data loader worker.
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exn:
        raise UnreadableImageError(f"{source}: cannot decode image ({exn})") from exn
    return image


def _image_format(data: bytes, source: str) -> str:
    """Checks that ``data`` decodes; returns the tar suffix for its real format ("jpg", "png", ...)."""
    with _decoded(data, source) as image:
        fmt = (image.format or "").lower()
    fmt = {"jpeg": "jpg", "mpo": "jpg", "tiff": "tif"}.get(fmt, fmt)
    # A format Pillow reads but that has no usual suffix still gets one that readers take as an image.
    return fmt if fmt in _SHARD_IMAGE_EXTS else "img"


# --------------------------------------------------------------------------- scanning


def scan_image_folder(
    root: str | os.PathLike, splits: Sequence[str] = DEFAULT_SPLITS, class_names: Sequence[str] | None = None
) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """Lists the images of ``root/<split>/<class>/...``.

    Returns the class names (index order) and, for each split folder that exists, the sorted
    ``(path relative to root, class index)`` of its images. The classes are the sorted union of
    the class folders of all splits (or ``class_names`` when given), so every split maps a class
    name to the same index even when one split lacks a class.
    """
    root = Path(root)
    split_dirs = {split: root / split for split in splits if (root / split).is_dir()}
    if not split_dirs:
        raise FileNotFoundError(f"{root}: no split folder found (looked for {', '.join(splits)})")
    found = sorted({d.name for s in split_dirs.values() for d in s.iterdir() if _visible_dir(d)})
    if class_names is None:
        class_names = found
    else:
        class_names = list(class_names)
        unknown = sorted(set(found) - set(class_names))
        if unknown:
            raise ValueError(f"{root}: class folders not in the given class names: {listing(unknown)}")
    if not class_names:
        raise ValueError(f"{root}: no class folders in {', '.join(str(d) for d in split_dirs.values())}")
    index_of = {name: i for i, name in enumerate(class_names)}

    samples: dict[str, list[tuple[str, int]]] = {}
    for split, split_dir in split_dirs.items():
        items = []
        for class_dir in sorted(d for d in split_dir.iterdir() if _visible_dir(d)):
            for path in sorted(class_dir.rglob("*")):
                if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
                    items.append((path.relative_to(root).as_posix(), index_of[class_dir.name]))
        if not items:
            raise ValueError(
                f"{split_dir}: empty split, no image files ({', '.join(IMAGE_SUFFIXES)}) in class folders "
                "under it (move an unlabeled split out of the tree)"
            )
        samples[split] = items
    return class_names, samples


def _visible_dir(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".")


# --------------------------------------------------------------------------- writing


def _read_checked(root: Path, rel: str) -> tuple[bytes, str]:
    """Loader for files of a folder tree: the bytes and the tar suffix of ``root/rel``."""
    path = root / rel
    try:
        data = path.read_bytes()
    except OSError as exn:
        raise UnreadableImageError(f"{path}: cannot read file ({exn})") from exn
    return data, _image_format(data, str(path))


def encoded_image(data: bytes, source: str) -> tuple[bytes, str]:
    """Loader result for in-memory encoded bytes (checked like a file would be)."""
    return data, _image_format(data, source)


def _try_load(
    load: Callable[[str], tuple[bytes, str]], source: str
) -> tuple[bytes, str] | UnreadableImageError:
    # Errors travel back as values so that the parent decides, in input order, to skip or fail.
    try:
        return load(source)
    except UnreadableImageError as exn:
        return exn


def write_shards(
    output_dir: str | os.PathLike,
    class_names: Sequence[str],
    splits: Mapping[str, Sequence[tuple[str, int]]],
    load: Callable[[str], tuple[bytes, str]],
    *,
    samples_per_shard: int = 1000,
    seed: int = 0,
    strict: bool = False,
    num_workers: int = 0,
    overwrite: bool = False,
) -> dict:
    """Writes ``splits`` (per split: ``(source, class index)``) as shards plus index.json into ``output_dir``.

    ``load(source)`` returns ``(encoded image bytes, tar suffix)`` or raises
    ``UnreadableImageError``; with ``num_workers > 0`` it runs in a process pool and must be
    picklable. Atomic (see :func:`~lit_matmamba.data.shards.publishing`); returns the index.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    for split, items in splits.items():
        if not items:
            raise ValueError(f"split {split!r} is empty")
        bad = sorted({c for _, c in items if not 0 <= c < len(class_names)})
        if bad:
            raise ValueError(f"split {split!r}: class indices {bad} outside 0..{len(class_names) - 1}")

    with publishing(output_dir, overwrite) as tmp:
        # fork where it is safe (Linux): spawned workers would first re-import the package, torch included.
        context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        pool = context.Pool(num_workers) if num_workers > 0 else None
        try:
            index = {
                "format": INDEX_FORMAT,
                "version": INDEX_VERSION,
                "class_names": list(class_names),
                "splits": {},
            }
            for split, items in splits.items():
                order = list(items)
                random.Random(seed).shuffle(order)
                fetch = functools.partial(_try_load, load)
                results = (
                    pool.imap(fetch, [s for s, _ in order], chunksize=64)
                    if pool
                    else map(fetch, (s for s, _ in order))
                )
                progress = tqdm(
                    zip(order, results), total=len(order), desc=f"packing {split}", unit="img", disable=None
                )
                index["splits"][split] = _write_split(
                    tmp, split, progress, len(class_names), samples_per_shard, strict
                )
        finally:
            if pool is not None:
                pool.terminate()
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return index


def _write_split(
    tmp: Path,
    split: str,
    loaded: Iterable[tuple[tuple[str, int], tuple[bytes, str] | UnreadableImageError]],
    num_classes: int,
    samples_per_shard: int,
    strict: bool,
) -> dict:
    shards: list[str] = []
    counts: list[int] = []
    checksums: list[str] = []
    class_counts = [0] * num_classes
    skipped: list[str] = []

    def kept() -> Iterator[tuple[bytes, str, int]]:
        for (source, cls), result in loaded:
            if isinstance(result, UnreadableImageError):
                if strict:
                    raise result
                skipped.append(source)
            else:
                yield *result, cls

    samples = kept()
    while chunk := list(itertools.islice(samples, samples_per_shard)):
        shards.append(shard_name(split, len(shards)))
        with open_shard(tmp / shards[-1]) as tar:
            for position, (data, ext, cls) in enumerate(chunk, start=sum(counts)):
                key = f"{split}-{position:08d}"
                add_member(tar, f"{key}.{ext}", data)
                add_member(tar, f"{key}.cls", str(cls).encode())
                class_counts[cls] += 1
        counts.append(len(chunk))
        checksums.append(file_sha256(tmp / shards[-1]))
    if skipped:
        warnings.warn(
            f"split {split!r}: skipped {len(skipped)} unreadable image(s): {listing(skipped)}", stacklevel=3
        )
    if not counts:
        raise ValueError(f"split {split!r}: no readable image left")
    return {
        "num_samples": sum(counts),
        "shards": shards,
        "counts": counts,
        "sha256": checksums,
        "class_counts": class_counts,
        "skipped": skipped,
    }


def prepare_images(
    src: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    splits: Sequence[str] = DEFAULT_SPLITS,
    class_names: Sequence[str] | None = None,
    samples_per_shard: int = 1000,
    seed: int = 0,
    strict: bool = False,
    num_workers: int = 0,
    overwrite: bool = False,
    verify: bool = False,
) -> dict:
    """Pack an image-folder tree ``src/<split>/<class>/<file>`` (ImageNet layout) into WebDataset shards.

    Writes ``output_dir/<split>-NNNNN.tar`` and ``output_dir/index.json``, which
    ``ImageDataModule(data_dir=output_dir)`` reads. Each split is shuffled (seeded) before sharding,
    so every shard mixes all classes. Images that do not decode are left out with a warning and
    listed in index.json. The output is written atomically and is a function of the tree and
    ``seed`` only: re-running gives byte-identical files.

    Args:
        src: Root of the image-folder tree.
        output_dir: Output folder; must not exist unless ``overwrite``.
        splits: Split folders to pack, those that exist under ``src``.
        class_names: Class order (index i = class_names[i]); default: sorted class folder names.
        samples_per_shard: Samples per shard (the last shard of a split may hold fewer).
        seed: Seed of the shuffle applied to each split before sharding.
        strict: Fail on the first unreadable image instead of leaving it out.
        num_workers: Processes that read and check images (0: in this process).
        overwrite: Replace ``output_dir`` if it exists (the old one stays until the new one is complete).
        verify: Read the written shards back and check them against index.json.

    Returns:
        The index written to ``output_dir/index.json``.
    """
    root = Path(src)
    class_names, samples = scan_image_folder(root, splits, class_names)
    totals = [0] * len(class_names)
    for items in samples.values():
        for _, cls in items:
            totals[cls] += 1
    empty = [name for name, n in zip(class_names, totals) if n == 0]
    if empty:
        raise ValueError(f"{root}: class folder(s) without images: {listing(empty)}")
    load = functools.partial(_read_checked, root.resolve())
    index = write_shards(
        output_dir,
        class_names,
        samples,
        load,
        samples_per_shard=samples_per_shard,
        seed=seed,
        strict=strict,
        num_workers=num_workers,
        overwrite=overwrite,
    )
    if verify:
        verify_shards(output_dir)
    return index


# --------------------------------------------------------------------------- reading


def load_index(location: str | os.PathLike) -> tuple[dict, str]:
    """Reads and checks the index of a shard folder (see :func:`~lit_matmamba.data.shards.locate`).

    Returns ``(index, where it was read)``.
    """
    index, where = read_index(
        location, INDEX_FORMAT, INDEX_VERSION, made_by="python main.py prepare images pack"
    )
    try:
        num_classes = len(index["class_names"])
        for split, entry in index["splits"].items():
            problems = []
            if len(entry["shards"]) != len(entry["counts"]):
                problems.append(f"{len(entry['shards'])} shards but {len(entry['counts'])} counts")
            if "sha256" in entry and len(entry["sha256"]) != len(entry["shards"]):
                problems.append(f"{len(entry['shards'])} shards but {len(entry['sha256'])} sha256")
            if len(entry["class_counts"]) != num_classes:
                problems.append(f"{len(entry['class_counts'])} class counts for {num_classes} classes")
            if not sum(entry["counts"]) == sum(entry["class_counts"]) == entry["num_samples"]:
                problems.append(
                    f"num_samples {entry['num_samples']}, shard counts sum to {sum(entry['counts'])}, "
                    f"class counts to {sum(entry['class_counts'])}"
                )
            if problems:
                raise ShardError(f"{where}: split {split!r} is inconsistent: {'; '.join(problems)}")
    except (KeyError, TypeError, AttributeError) as exn:
        raise ShardError(f"{where}: malformed shard index ({exn!r})") from exn
    return index, where


def shard_checksums(index: dict, split: str) -> list[str | None]:
    """The sha256 of each shard of ``split`` (None for each in an index written without them)."""
    entry = index["splits"][split]
    return entry.get("sha256") or [None] * len(entry["shards"])


def has_checksums(index: dict) -> bool:
    """Whether the index lists the sha256 of every shard (indexes of older versions do not)."""
    return all("sha256" in entry for entry in index["splits"].values())


def iter_shard(
    url: str,
    expected: int,
    num_classes: int,
    sha256: str | None = None,
    verified: set[str] | None = None,
) -> Iterator[tuple[str, bytes, int]]:
    """Yields ``(key, encoded image, class index)`` for each sample of one shard, in order.

    Raises ``ShardError`` naming the shard when it cannot be opened, its bytes do not have the
    ``sha256`` of the index (checked unless ``url`` is in ``verified``, see
    :func:`~lit_matmamba.data.shards.open_checked`), a sample lacks its image or class, a class
    index is out of range, or (when read to the end) the shard does not hold the ``expected``
    number of samples.
    """
    count = 0
    try:
        with open_checked(url, sha256, set() if verified is None else verified) as stream:
            key, parts = None, {}
            for member in tar_file_iterator(stream):
                member_key, suffix = base_plus_ext(member["fname"])
                if member_key != key:
                    if key is not None:
                        yield _sample(url, key, parts, num_classes)
                        count += 1
                    key, parts = member_key, {}
                parts[suffix.lower()] = member["data"]
            if key is not None:
                yield _sample(url, key, parts, num_classes)
                count += 1
            stream.finish()
    except (tarfile.TarError, OSError) as exn:
        raise ShardError(f"{url}: cannot read shard ({exn})") from exn
    if count != expected:
        raise ShardError(f"{url}: holds {count} samples but the index says {expected}")


def _sample(url: str, key: str, parts: dict[str, bytes], num_classes: int) -> tuple[str, bytes, int]:
    images = [ext for ext in parts if ext in _SHARD_IMAGE_EXTS]
    if len(images) != 1 or "cls" not in parts:
        raise ShardError(f"{url}: sample {key!r} needs one image and a .cls member, has {sorted(parts)}")
    try:
        cls = int(parts["cls"])
    except ValueError as exn:
        raise ShardError(f"{url}: sample {key!r} has a non-integer class {parts['cls'][:20]!r}") from exn
    if not 0 <= cls < num_classes:
        raise ShardError(f"{url}: sample {key!r} has class {cls}, outside 0..{num_classes - 1}")
    return key, parts[images[0]], cls


def verify_shards(
    location: str | os.PathLike, splits: Sequence[str] | None = None, decode: bool = False
) -> dict:
    """Read every shard of a shard folder back and check it against its index.json.

    Checks each shard's sha256, per-shard counts, per-class counts, class range and key
    uniqueness, and with ``decode`` that every image decodes. Raises ``ShardError`` listing the problems; returns the index.

    Args:
        location: Shard folder, its index.json, or a URL to either (see ``data_dir`` of ImageDataModule).
        splits: Splits to check; default all.
        decode: Also decode every image.
    """
    index, where = load_index(location)
    if not has_checksums(index):
        warn_unverifiable(where, "python main.py prepare images pack")
    shard_path = locate(location)
    num_classes = len(index["class_names"])
    problems = []
    for split in splits or list(index["splits"]):
        if split not in index["splits"]:
            raise ShardError(f"{where}: no split {split!r} (has {sorted(index['splits'])})")
        entry = index["splits"][split]
        class_counts = [0] * num_classes
        keys: set[str] = set()
        for shard, expected, sha256 in zip(entry["shards"], entry["counts"], shard_checksums(index, split)):
            url = shard_path(shard)
            try:
                for key, data, cls in iter_shard(url, expected, num_classes, sha256):
                    if key in keys:
                        problems.append(f"{url}: duplicate key {key!r}")
                    keys.add(key)
                    class_counts[cls] += 1
                    if decode:
                        open_rgb(data, f"{url}:{key}")
            except (ShardError, UnreadableImageError) as exn:
                problems.append(str(exn))
        if class_counts != entry["class_counts"]:
            diff = [
                f"{index['class_names'][i]}: {got} (index {want})"
                for i, (got, want) in enumerate(zip(class_counts, entry["class_counts"]))
                if got != want
            ]
            problems.append(f"split {split!r}: class counts differ from the index: {listing(diff)}")
    if problems:
        raise ShardError(f"{where}: shards do not match the index:\n  " + "\n  ".join(problems))
    return index
