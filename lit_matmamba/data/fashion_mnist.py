"""Fashion-MNIST as the offline default image data set, from Debian's package ``dataset-fashion-mnist``.

The package (MIT license, Zalando Research) ships the four original IDX files under
``/usr/share/datasets/fashion-mnist/``: 60,000 train and 10,000 test images, 28x28 grayscale, 10
classes. ``ensure_fashion_mnist`` fetches the .deb with ``apt-get download`` (no install, so no
root needed for that step), decodes the IDX files to PNG, keeps the last 5,000 train images as
``val`` and the official test set as ``test``, and packs the splits with the same shard writer as
``prepare_images`` into ``<data_dir>/fashion-mnist/``, which ``ImageDataModule`` then reads like any
other shard folder. Built once, atomically, and reused.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from lit_matmamba.data.prepare_images import encoded_image, write_shards
from lit_matmamba.data.shards import INDEX_NAME, default_data_dir

PACKAGE = "dataset-fashion-mnist"
# Where the package puts the files, inside the .deb and once installed.
PACKAGE_DIR = "usr/share/datasets/fashion-mnist"
# Label index order of the original data set.
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
NUM_TRAIN, NUM_TEST, NUM_VAL = 60_000, 10_000, 5_000
DATASET_DIR = "fashion-mnist"
# Folder (under the data dir) where someone without apt can put the four IDX .gz files by hand.
MANUAL_DIR = "fashion-mnist-idx"
# Fashion-MNIST is small: 10 shards of ~7,000 samples each keep the file count low.
SAMPLES_PER_SHARD = 7_000


def ensure_fashion_mnist(data_dir: str | os.PathLike | None = None) -> Path:
    """Build Fashion-MNIST, the offline default image data set, as shards under ``data_dir`` once.

    Sources, in order: IDX files put by hand in ``<data_dir>/fashion-mnist-idx/``; the installed
    package (``/usr/share/datasets/fashion-mnist``); ``apt-get download dataset-fashion-mnist``
    (running ``apt-get update`` first only when apt has no package lists yet). Splits: ``train``
    (first 55,000 official train images), ``val`` (last 5,000), ``test`` (official 10,000).
    Several processes may call this at once: one build wins, the others use it.

    Args:
        data_dir: Root of the data cache; default ``$LIT_MATMAMBA_DATA``, else ``./data``.

    Returns:
        The shard folder, ``<data_dir>/fashion-mnist``.
    """
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    out = root / DATASET_DIR
    if (out / INDEX_NAME).is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fashion-mnist-raw-", dir=root) as tmp:
        arrays = _read_idx_files(_find_idx_files(root / MANUAL_DIR, Path(tmp)))
    images, labels = arrays["train_images"], arrays["train_labels"]
    split_arrays = {
        "train": (images[:-NUM_VAL], labels[:-NUM_VAL]),
        "val": (images[-NUM_VAL:], labels[-NUM_VAL:]),
        "test": (arrays["test_images"], arrays["test_labels"]),
    }
    encoded = {
        f"{split}/{i:05d}.png": _png(image)
        for split, (split_images, _) in split_arrays.items()
        for i, image in enumerate(split_images)
    }
    splits = {
        split: [(f"{split}/{i:05d}.png", int(label)) for i, label in enumerate(split_labels)]
        for split, (_, split_labels) in split_arrays.items()
    }
    try:
        write_shards(
            out,
            CLASS_NAMES,
            splits,
            lambda source: encoded_image(encoded[source], f"fashion-mnist:{source}"),
            samples_per_shard=SAMPLES_PER_SHARD,
        )
    except FileExistsError:
        # Another process finished first; its result is what this one would have written.
        if not (out / INDEX_NAME).is_file():
            raise
    return out


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _find_idx_files(manual_dir: Path, tmp: Path) -> dict[str, Path]:
    for folder in (manual_dir, Path("/") / PACKAGE_DIR):
        paths = {name: folder / file for name, file in FILES.items()}
        if all(p.is_file() for p in paths.values()):
            return paths
    deb = _apt_download(tmp, manual_dir)
    return _extract_deb(deb, tmp)


def _manual_help(manual_dir: Path) -> str:
    return (
        f"To get Fashion-MNIST by hand: install the Debian package ('apt-get install {PACKAGE}'), or put "
        f"the four files {', '.join(FILES.values())} of the Fashion-MNIST project "
        f"(github.com/zalandoresearch/fashion-mnist) into {manual_dir}/, or pass data_dir= to your own data."
    )


def _apt_download(dest: Path, manual_dir: Path) -> Path:
    apt = shutil.which("apt-get")
    if apt is None:
        raise RuntimeError(
            f"apt-get not found, cannot fetch the {PACKAGE} package. {_manual_help(manual_dir)}"
        )
    download = [apt, "download", PACKAGE]
    result = subprocess.run(download, cwd=dest, capture_output=True, text=True)
    if result.returncode != 0 and _lists_missing(result.stderr):
        # A fresh machine or container has no package lists yet: fetch them once, then retry.
        update = subprocess.run([apt, "update"], capture_output=True, text=True)
        if update.returncode != 0:
            raise RuntimeError(
                f"'apt-get update' failed (needed to find {PACKAGE}):\n{update.stderr.strip()}\n{_manual_help(manual_dir)}"
            )
        result = subprocess.run(download, cwd=dest, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"'apt-get download {PACKAGE}' failed:\n{result.stderr.strip()}\n{_manual_help(manual_dir)}"
        )
    debs = sorted(dest.glob(f"{PACKAGE}_*.deb"))
    if not debs:
        raise RuntimeError(f"'apt-get download {PACKAGE}' left no .deb in {dest}. {_manual_help(manual_dir)}")
    return debs[0]


def _lists_missing(stderr: str) -> bool:
    return any(
        message in stderr
        for message in ("Unable to locate package", "has no installation candidate", "Can't select candidate")
    )


def _extract_deb(deb: Path, dest: Path) -> dict[str, Path]:
    """Extracts the IDX files from the .deb's data archive (via dpkg-deb, which reads any compression)."""
    dpkg_deb = shutil.which("dpkg-deb")
    if dpkg_deb is None:
        raise RuntimeError(f"dpkg-deb not found, cannot unpack {deb}")
    result = subprocess.run([dpkg_deb, "--fsys-tarfile", str(deb)], capture_output=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"dpkg-deb --fsys-tarfile {deb} failed: {result.stderr.decode(errors='replace').strip()}"
        )
    paths = {}
    with tarfile.open(fileobj=io.BytesIO(result.stdout)) as archive:
        for name, file in FILES.items():
            member = archive.extractfile(f"./{PACKAGE_DIR}/{file}")
            if member is None:
                raise RuntimeError(f"{deb}: {PACKAGE_DIR}/{file} is not a regular file")
            paths[name] = dest / file
            paths[name].write_bytes(member.read())
    return paths


def _read_idx_files(paths: Mapping[str, Path]) -> dict[str, np.ndarray]:
    arrays = {name: _read_idx(path) for name, path in paths.items()}
    for split, expected in (("train", NUM_TRAIN), ("test", NUM_TEST)):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.shape != (expected, 28, 28) or labels.shape != (expected,):
            raise ValueError(
                f"{paths[f'{split}_images']}: expected {expected} 28x28 images and labels, "
                f"got images {images.shape}, labels {labels.shape}"
            )
        if labels.max() >= len(CLASS_NAMES):
            raise ValueError(
                f"{paths[f'{split}_labels']}: label {labels.max()} >= {len(CLASS_NAMES)} classes"
            )
    return arrays


def _read_idx(path: Path) -> np.ndarray:
    """Reads an IDX file (gzip or not): big-endian magic (0, 0, dtype 0x08 = uint8, ndim), dims, data."""
    with open(path, "rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
    with (gzip.open if gzipped else open)(path, "rb") as file:
        data = file.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError(f"{path}: not a uint8 IDX file")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {array.size} values")
    return array.reshape(shape)
