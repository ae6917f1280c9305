"""`python main.py prepare` end to end, and the shard-folder helpers text and image data share."""

from __future__ import annotations

import ast
import itertools
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from PIL import Image

from lit_matmamba.data import shards
from lit_matmamba.data.prepare import main
from lit_matmamba.data.prepare_images import load_index
from lit_matmamba.data.prepare_text import prepare_text
from lit_matmamba.data.shards import default_data_dir, locate, publishing, remove_stale_temporaries
from lit_matmamba.data.text import TextDataModule, read_index
from lit_matmamba.data.tokenizer import train_bpe_tokenizer
from lit_matmamba.data.vision import ImageDataModule

DATA_PACKAGE = Path(shards.__file__).parent
PLAIN = dict(randaugment_ops=0, random_erasing=0.0, mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.0)
WORDS = ["thou", "art", "the", "sun", "and", "moon", "of", "night", "ere", "day", "doth", "break"]


def text_files(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    words = itertools.cycle(WORDS)
    for i in range(count):
        (folder / f"doc{i}.txt").write_text(" ".join(next(words) for _ in range(200 + 7 * i)))
    return folder


def image_tree(root: Path, counts: dict[str, int]) -> Path:
    for split, n in counts.items():
        for k in range(n):
            path = root / split / ("cat", "dog")[k % 2] / f"{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (6, 5), (30 * k, 9, 90)).save(path)
    return root


# --------------------------------------------------------------------------- help


@pytest.mark.parametrize(
    "command, expected",
    [
        ([], ["text", "images", "Tokenize text files"]),
        (["text"], ["--output_dir", "--tokenizer", "--train", "--val_fraction", "Output directory layout"]),
        (["images"], ["pack", "verify", "fashion-mnist"]),
        (
            ["images", "pack"],
            ["--src", "--output_dir", "--samples_per_shard", "Root of the image-folder tree"],
        ),
        (["images", "verify"], ["--location", "--decode", "Also decode every image"]),
        (["images", "fashion-mnist"], ["--data_dir", "LIT_MATMAMBA_DATA"]),
    ],
    ids=["prepare", "text", "images", "images pack", "images verify", "images fashion-mnist"],
)
def test_help_lists_the_options_with_their_help(command, expected, capsys):
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python main.py prepare")
    for part in expected:
        assert part in out, part


# --------------------------------------------------------------------------- end to end


def test_prepare_text_end_to_end(tmp_path, capsys):
    train = text_files(tmp_path / "train", 3)
    val = text_files(tmp_path / "val", 1)
    tokenizer = tmp_path / "tokenizer.json"
    train_bpe_tokenizer([p.read_text() for p in sorted(train.iterdir())], vocab_size=280).save(str(tokenizer))
    args = ["text", "--output_dir", str(tmp_path / "out"), "--tokenizer", str(tokenizer)]
    args += ["--train", str(train), "--val", str(val / "doc0.txt"), "--seq_len", "16", "--progress", "false"]
    main(args)
    out = capsys.readouterr().out
    assert "train: " in out and "val: " in out and "sequences of 16 tokens" in out
    assert read_index(str(tmp_path / "out"))["seq_len"] == 16
    first = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}

    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code.startswith(f"error: {tmp_path / 'out'} already exists: pass overwrite=True")
    main([*args, "--overwrite", "true"])
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == first

    dm = TextDataModule(str(tmp_path / "out"), seq_len=16, batch_size=2, num_workers=0)
    assert next(iter(dm.val_dataloader())).shape == (2, 16)


def test_prepare_images_pack_and_verify_end_to_end(tmp_path, capsys):
    src = image_tree(tmp_path / "src", {"train": 5, "val": 2})
    out = tmp_path / "out"
    main(
        ["images", "pack", "--src", str(src), "--output_dir", str(out)]
        + ["--samples_per_shard", "2", "--verify", "true"]
    )
    assert "train: 5 samples in 3 shards" in capsys.readouterr().out
    main(["images", "verify", "--location", str(out), "--splits", "[val]", "--decode", "true"])
    assert "val: 2 samples in 1 shards" in capsys.readouterr().out
    index, _ = load_index(out)
    assert index["class_names"] == ["cat", "dog"]
    dm = ImageDataModule(str(out), batch_size=2, num_workers=0, img_size=4, **PLAIN)
    dm.setup("fit")
    assert sum(len(targets) for _, targets in dm.dataloader("train")) == 5


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_src", "no split folder found"),
        ("missing_tokenizer", "tokenizer file"),
        ("verify_missing", "index.json not found"),
    ],
)
def test_bad_input_ends_with_one_clear_line(tmp_path, capsys, case, message):
    out = ["--output_dir", str(tmp_path / "o")]
    if case == "missing_src":
        args = ["images", "pack", "--src", str(tmp_path / "nowhere"), *out]
    elif case == "missing_tokenizer":
        train = text_files(tmp_path / "t", 1)
        args = ["text", *out, "--tokenizer", str(tmp_path / "t.json"), "--train", str(train)]
    else:
        args = ["images", "verify", "--location", str(tmp_path)]
    with pytest.raises(SystemExit) as done:
        main(args)
    code = done.value.code
    assert isinstance(code, str) and code.startswith("error: ") and "\n" not in code and message in code
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["images", "pack", "--src", "a", "--output_dir", "b", "--samples_per_shard", "many"],
            "samples_per_shard",
        ),
        (["images", "pack", "--src", "a"], "output_dir"),
        (["images", "unpack"], "unpack"),
        (["text", "--output_dir", "o", "--tokenizer", "t.json", "--train", "x", "--seqlen", "8"], "--seqlen"),
    ],
)
def test_bad_arguments_are_usage_errors(args, message, capsys):
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err and "Traceback" not in err


# --------------------------------------------------------------------------- shared helpers


def test_locate_every_form_of_location(tmp_path):
    assert locate(tmp_path)("train-00000.tar") == str(tmp_path / "train-00000.tar")
    assert locate(f"{tmp_path}/index.json")("tokenizer.json") == str(tmp_path / "tokenizer.json")
    assert locate("https://host/data/")("index.json") == "https://host/data/index.json"
    assert locate("https://host/data/index.json")("val-00001.tar") == "https://host/data/val-00001.tar"
    assert locate("pipe:aws s3 cp s3://b/d/{} -")("index.json") == "pipe:aws s3 cp s3://b/d/index.json -"
    assert shards.index_location(f"{tmp_path}/mine.json") == f"{tmp_path}/mine.json"
    with pytest.raises(ValueError, match=r"needs \{\}"):
        locate("pipe:cat data/index.json")


def test_default_data_dir_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("LIT_MATMAMBA_DATA", "/somewhere")
    assert default_data_dir() == Path("/somewhere")
    monkeypatch.setenv("LIT_MATMAMBA_DATA", "")
    assert default_data_dir() == Path("data")


def test_publishing_is_atomic_and_detects_a_concurrent_writer(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), publishing(out) as tmp:
        (tmp / "half").write_text("written")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(FileExistsError, match="appeared while writing"), publishing(out) as tmp:
        (tmp / "mine").write_text("mine")
        out.mkdir()  # another process publishes first
    assert list(out.iterdir()) == [] and [p.name for p in tmp_path.iterdir()] == ["out"]

    with publishing(out, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new"] and [p.name for p in tmp_path.iterdir()] == ["out"]


# A `prepare text` that stops after writing some sequences, until it is killed.
STALLING_PREPARE = """
import itertools, sys, time
from lit_matmamba.data import prepare_text as module

write, calls = module._SplitWriter._write, itertools.count()

def write_then_stall(self, sequence):
    write(self, sequence)
    if next(calls) == 20:
        print("writing", flush=True)
        time.sleep(300)

module._SplitWriter._write = write_then_stall
module.prepare_text(sys.argv[1], sys.argv[2], train=sys.argv[3], seq_len=8, sequences_per_shard=8, progress=False)
"""


def test_a_killed_prepare_is_cleaned_up_by_the_next_and_a_terminated_one_by_itself(tmp_path, capsys):
    train = text_files(tmp_path / "train", 3)
    tokenizer = tmp_path / "tokenizer.json"
    train_bpe_tokenizer([p.read_text() for p in sorted(train.iterdir())], vocab_size=280).save(str(tokenizer))
    parents = {"killed": tmp_path / "killed", "terminated": tmp_path / "terminated"}
    writers = {
        how: subprocess.Popen(
            [sys.executable, "-c", STALLING_PREPARE, str(parent / "out"), str(tokenizer), str(train)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for how, parent in parents.items()
    }
    try:
        for writer in writers.values():
            assert writer.stdout.readline() == "writing\n"
        (stale,) = parents["killed"].iterdir()
        assert stale.name.startswith(".out.tmp-") and list(stale.glob("train-*.tar"))
        # Folders whose writer is alive, or cannot be seen from here, or of an older version stay.
        others = [f".out.tmp-elsewhere-1-{uuid.uuid4().hex}", f".out.tmp-{uuid.uuid4().hex}"]
        for name in others:
            (parents["killed"] / name).mkdir()
        assert remove_stale_temporaries(parents["killed"]) == []

        writers["terminated"].terminate()
        assert writers["terminated"].wait(timeout=60) == 128 + signal.SIGTERM
        assert list(parents["terminated"].iterdir()) == []

        writers["killed"].kill()
        writers["killed"].wait(timeout=60)
        assert stale.is_dir()
    finally:
        for writer in writers.values():
            writer.kill()
            writer.wait()
    capsys.readouterr()
    prepare_text(parents["killed"] / "out", tokenizer, train=str(train), seq_len=8, progress=False)
    err = capsys.readouterr().err
    assert (
        f"removed 1 temporary folder(s) left in {parents['killed']} by killed prepare runs: {stale.name}"
        in err
    )
    assert sorted(p.name for p in parents["killed"].iterdir()) == sorted(["out", *others])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_processes_forked_while_publishing_get_the_sigterm_handler_from_before(tmp_path):
    """A pool worker with publishing's Python-level handler could miss pool.terminate()'s SIGTERM and hang."""
    with publishing(tmp_path / "out"):
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        pid = os.fork()
        if pid == 0:
            os._exit(0 if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL else 1)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_the_data_package_has_no_import_cycle():
    """Module-level and function-level imports alike, so that a lazy import does not hide a cycle."""
    graph = {}
    for path in DATA_PACKAGE.glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "lit_matmamba.data":
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lit_matmamba.data."):
                imported.add(node.module.split(".")[2])
            elif isinstance(node, ast.Import):
                imported |= {
                    a.name.split(".")[2] for a in node.names if a.name.startswith("lit_matmamba.data.")
                }
        graph[path.stem] = imported

    def visit(module, stack):
        assert module not in stack, f"import cycle: {' -> '.join([*stack, module])}"
        for other in sorted(graph[module]):
            visit(other, [*stack, module])

    for module in graph:
        visit(module, [])
