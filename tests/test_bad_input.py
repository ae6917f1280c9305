"""The bad-input battery (issue #26, "Nothing silent"): each case does one thing a user can get wrong
and must end in one clear error, or a warning, that names the problem and the fix, before work is
wasted.

A case is a function of ``tmp_path`` registered with ``@bad_input(expected, match)``: it must raise
``expected`` (or warn it, for a ``Warning`` subclass) with a message that ``match`` (a regex, searched)
finds. Add a case by writing one more such function; the helpers above the cases build small data sets.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers

from lit_matmamba.cli import main as cli_main
from lit_matmamba.data.prepare import main as prepare_main
from lit_matmamba.data.prepare_images import ShardError, UnreadableImageError, prepare_images, verify_shards
from lit_matmamba.data.prepare_text import prepare_text
from lit_matmamba.data.text import TextDataModule
from lit_matmamba.data.tokenizer import EOS_TOKEN
from lit_matmamba.data.vision import ImageDataModule

CASES: list = []


def bad_input(expected: type[BaseException] | type[Warning], match: str) -> Callable:
    """Register the decorated ``case(tmp_path)``: it must raise (or warn) ``expected``, matching ``match``."""

    def register(case: Callable[[Path], object]) -> Callable[[Path], object]:
        CASES.append(pytest.param(case, expected, match, id=case.__name__))
        return case

    return register


# --------------------------------------------------------------------------- helpers

PLAIN = dict(randaugment_ops=0, random_erasing=0.0, mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.0)
WORDS = 12 * 8  # text_data: 12 stored sequences of 8 tokens


def text_data(tmp: Path, reverse: bool = False) -> Path:
    """Shards of 12 sequences of 8 tokens, 4 per shard, from a word-level tokenizer of ``WORDS + 2`` ids
    (``reverse``: another tokenizer of the same size, with the words' ids in reverse order)."""
    tmp.mkdir(parents=True, exist_ok=True)
    ids = {f"w{i}": WORDS + 1 - i if reverse else i for i in range(1, WORDS + 1)}
    vocab = {EOS_TOKEN: 0, **ids, "[UNK]": WORDS + 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([EOS_TOKEN])
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "words.txt").write_text(" ".join(f"w{i}" for i in range(1, WORDS + 1)))
    text = str(tmp / "words.txt")
    out = tmp / "text"
    prepare_text(
        out, tmp / "tokenizer.json", train=text, val=text, seq_len=8, sequences_per_shard=4, progress=False
    )
    return out


def read_text(location: Path | str, **kwargs) -> None:
    """One epoch of the train split, as training reads it."""
    dm = TextDataModule(str(location), seq_len=8, batch_size=2, num_workers=0, **kwargs)
    for _ in dm.train_dataloader():
        pass


def image_data(tmp: Path, **kwargs) -> Path:
    """Shards of 4 train and 2 val 6x5 PNGs of two classes, 2 samples per shard."""
    for split, n in (("train", 4), ("val", 2)):
        for k in range(n):
            path = tmp / "src" / split / ("cat", "dog")[k % 2] / f"{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (6, 5), (40 * k, 9, 90)).save(path)
    out = tmp / "images"
    prepare_images(tmp / "src", out, samples_per_shard=2, **kwargs)
    return out


def read_images(location: Path | str) -> None:
    dm = ImageDataModule(str(location), batch_size=2, num_workers=0, img_size=4, **PLAIN)
    dm.setup("fit")
    for _ in dm.train_dataloader():
        pass


def edit_index(folder: Path, edit: Callable[[dict], None]) -> None:
    index = json.loads((folder / "index.json").read_text())
    edit(index)
    (folder / "index.json").write_text(json.dumps(index))


def first_token_offset(shard: Path) -> int:
    """Byte offset of the first token of the first sequence of a text shard."""
    data = shard.read_bytes()
    npy = data.index(b"\x93NUMPY")
    return npy + 10 + int.from_bytes(data[npy + 8 : npy + 10], "little")


def overwrite(path: Path, offset: int, value: bytes) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + len(value)] = value
    path.write_bytes(bytes(data))


def flip_bit(path: Path, offset: int) -> None:
    """The lowest bit of byte ``offset`` of ``path``: the damage a bad disk or copy does."""
    overwrite(path, offset, bytes([path.read_bytes()[offset] ^ 1]))


LM_DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "lm_demo.yaml")


def cli(*args: str) -> None:
    """`main.py ARGS` as a user sees it: a SystemExit whose message is what it wrote to stderr and
    its exit message (a parse error prints its message and exits with a status only)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            cli_main(list(args))
    except SystemExit as done:
        raise SystemExit(err.getvalue() + (done.code if isinstance(done.code, str) else "")) from None


def tiny_module(**kwargs):
    from lit_matmamba import MatMambaLM
    from lit_matmamba.models import MatMambaConfig
    from lit_matmamba.training import LanguageModeling

    torch.manual_seed(0)
    model = MatMambaLM(MatMambaConfig.from_name("lm-tiny", vocab_size=WORDS + 2))
    kwargs.setdefault("optimizer", lambda params: torch.optim.AdamW(params, lr=1e-2))
    return LanguageModeling(model, **kwargs)


def fit(
    tmp: Path, module, ckpt_path: Path | None = None, callbacks=(), data=None, stage="fit", **trainer_kwargs
):
    """Fit ``module`` (``stage``: or validate it) on 4 batches of random tokens (an epoch), or on the
    data module ``data``, with a ModelCheckpoint(save_last) in ``tmp / "ckpt"``; returns the trainer."""
    import lightning as L
    from torch.utils.data import DataLoader

    from lit_matmamba.training import ModelCheckpoint

    random_tokens = torch.randint(0, WORDS + 2, (16, 9), generator=torch.Generator().manual_seed(0))
    trainer = L.Trainer(
        **{
            "accelerator": "cpu",
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": tmp,
            "num_sanity_val_steps": 0,
            "callbacks": [ModelCheckpoint(dirpath=tmp / "ckpt", save_last=True), *callbacks],
            **trainer_kwargs,
        }
    )
    if isinstance(data, L.LightningDataModule):
        getattr(trainer, stage)(module, datamodule=data, ckpt_path=ckpt_path)
    elif stage == "fit":
        loader = DataLoader(random_tokens, batch_size=4)
        trainer.fit(module, loader, loader, ckpt_path=ckpt_path)
    return trainer


def break_weights_at(step: int):
    """A callback that makes the weights NaN before optimizer step ``step`` + 1 (a diverged run)."""
    import lightning as L

    class Break(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == step:
                with torch.no_grad():
                    pl_module.model.backbone.norm_f.weight.fill_(float("nan"))

    return Break()


# --------------------------------------------------------------------------- prepare text: inputs


def prepare_text_from(tmp: Path, name: str) -> None:
    """`prepare_text` of the file `tmp/name` with the tokenizer of `text_data(tmp)`."""
    prepare_text(tmp / "out", text_data(tmp) / "tokenizer.json", train=str(tmp / name), seq_len=8)


@bad_input(ValueError, r"nul\.txt is not text: it holds a NUL byte \(first at byte 0\)")
def prepare_text_file_of_nul_bytes(tmp):
    (tmp / "nul.txt").write_bytes(b"\0" * 4096)
    prepare_text_from(tmp, "nul.txt")


@bad_input(ValueError, r"late\.txt is not text: it holds a NUL byte \(first at character 70000\)")
def prepare_text_nul_byte_past_the_checked_start(tmp):
    (tmp / "late.txt").write_bytes(b"w1 " * 23333 + b"w\0")
    prepare_text_from(tmp, "late.txt")


@bad_input(ValueError, r"latin1\.jsonl is not UTF-8 text .*convert it to UTF-8")
def prepare_text_not_utf8(tmp):
    (tmp / "latin1.jsonl").write_bytes(
        json.dumps({"text": "caf\xe9"}).encode("latin-1").replace(b"\\u00e9", b"\xe9")
    )
    prepare_text_from(tmp, "latin1.jsonl")


@bad_input(ValueError, r"plain\.txt\.gz is not a readable \.txt\.gz file \(Not a gzipped file")
def prepare_text_gz_that_is_not_gzip(tmp):
    (tmp / "plain.txt.gz").write_text("w1 w2 w3")
    prepare_text_from(tmp, "plain.txt.gz")


@bad_input(ValueError, r"cut\.txt\.gz is damaged \(Compressed file ended")
def prepare_text_truncated_gz(tmp):
    words = random.Random(0).choices([f"w{i}" for i in range(1, WORDS + 1)], k=100_000)
    (tmp / "cut.txt.gz").write_bytes(gzip.compress(" ".join(words).encode())[:100_000])
    prepare_text_from(tmp, "cut.txt.gz")


@bad_input(ValueError, r"fake\.parquet is not a readable parquet file")
def prepare_text_parquet_that_is_not_parquet(tmp):
    (tmp / "fake.parquet").write_text("w1 w2 w3")
    prepare_text_from(tmp, "fake.parquet")


@bad_input(ValueError, r"unsupported input file type: .*data\.csv")
def prepare_text_unsupported_input(tmp):
    (tmp / "data.csv").write_text("text\nw1\n")
    prepare_text_from(tmp, "data.csv")


@bad_input(FileExistsError, r"text already exists: pass overwrite=True")
def prepare_text_into_an_existing_output(tmp):
    data = text_data(tmp)
    prepare_text(data, data / "tokenizer.json", train=str(tmp / "words.txt"), seq_len=8, progress=False)


@bad_input(SystemExit, r"^error: tokenizer file .*missing\.json not found")
def prepare_text_command_without_its_tokenizer(tmp):
    (tmp / "a.txt").write_text("w1 w2")
    prepare_main(
        ["text", "--output_dir", str(tmp / "o"), "--tokenizer", str(tmp / "missing.json")]
        + ["--train", str(tmp / "a.txt")]
    )


# --------------------------------------------------------------------------- text shards


@bad_input(FileNotFoundError, r"nowhere/index\.json not found: point data_dir at a folder made by")
def text_data_dir_that_does_not_exist(tmp):
    read_text(tmp / "nowhere")


@bad_input(
    ValueError, r"has format version 99, this code reads version 1: run `python main.py prepare text` again"
)
def text_index_of_another_version(tmp):
    data = text_data(tmp)
    edit_index(data, lambda index: index.update(version=99))
    read_text(data)


@bad_input(
    FileNotFoundError, r"split 'train' .* 1 shard\(s\) listed in the index not found: .*train-00001\.tar"
)
def text_shard_missing(tmp):
    data = text_data(tmp)
    (data / "train-00001.tar").unlink()
    read_text(data)


@bad_input(
    ShardError,
    r"shard .*train-00001\.tar is damaged .*: its sha256 is [0-9a-f]{64}, the index lists [0-9a-f]{64}; copy",
)
def text_shard_damaged_with_token_ids_in_range(tmp):
    data = text_data(tmp)
    shard = data / "train-00001.tar"
    flip_bit(shard, first_token_offset(shard))  # token id 33 becomes 32: in range
    read_text(data)


@bad_input(ShardError, r"shard file://.*train-00002\.tar is damaged .*sha256")
def text_shard_damaged_read_through_a_url(tmp):
    data = text_data(tmp)
    flip_bit(data / "train-00002.tar", first_token_offset(data / "train-00002.tar"))
    read_text(f"file://{data}", shuffle=False)


@bad_input(
    ValueError,
    r"train-00001\.tar of split 'train': sequence 0000000004 holds token id 65535, but index\.json gives vocab_size 98",
)
def text_token_id_beyond_the_vocabulary(tmp):
    # A shard whose index lies about its tokenizer: the checksum matches, the ids do not.
    data = text_data(tmp)
    shard = data / "train-00001.tar"
    overwrite(shard, first_token_offset(shard), b"\xff\xff")
    sha256 = hashlib.sha256(shard.read_bytes()).hexdigest()
    edit_index(data, lambda index: index["splits"]["train"]["shards"][1].update(sha256=sha256))
    read_text(data)


@bad_input(
    UserWarning,
    r"index\.json lists no sha256 of its shards .* run `python main.py prepare text` again with --overwrite true",
)
def text_index_without_checksums(tmp):
    data = text_data(tmp)
    edit_index(data, lambda index: [s.pop("sha256") for e in index["splits"].values() for s in e["shards"]])
    read_text(data)


@bad_input(
    ValueError, r"vocab_size 98\), but the model has vocab_size 64: set the model's vocab_size to at least 98"
)
def text_model_vocabulary_smaller_than_the_data(tmp):
    from lit_matmamba import MatMambaLM
    from lit_matmamba.models import MatMambaConfig
    from lit_matmamba.training import LanguageModeling

    module = LanguageModeling(MatMambaLM(MatMambaConfig.from_name("lm-tiny", vocab_size=64)))
    module.check_data(TextDataModule(str(text_data(tmp))))


# --------------------------------------------------------------------------- images


@bad_input(FileNotFoundError, r"data_dir .*nowhere does not exist")
def image_data_dir_that_does_not_exist(tmp):
    read_images(tmp / "nowhere")


@bad_input(UnreadableImageError, r"bad\.png: cannot decode image")
def image_corrupt_in_a_strict_pack(tmp):
    (tmp / "src/train/cat").mkdir(parents=True)
    (tmp / "src/train/cat/bad.png").write_bytes(b"not a png")
    image_data(tmp, strict=True)


@bad_input(UserWarning, r"split 'train': skipped 1 unreadable image\(s\): train/cat/bad\.png")
def image_corrupt_left_out_of_a_pack(tmp):
    (tmp / "src/train/cat").mkdir(parents=True)
    (tmp / "src/train/cat/bad.png").write_bytes(b"not a png")
    image_data(tmp)


@bad_input(FileExistsError, r"images already exists: pass overwrite=True")
def image_pack_into_an_existing_output(tmp):
    image_data(tmp)
    prepare_images(tmp / "src", tmp / "images")


@bad_input(
    ValueError,
    r"has format version 2, this code reads version 1: run `python main.py prepare images pack` again",
)
def image_index_of_another_version(tmp):
    data = image_data(tmp)
    edit_index(data, lambda index: index.update(version=2))
    read_images(data)


@bad_input(FileNotFoundError, r"split 'val' .* 1 shard\(s\) listed in the index not found: .*val-00000\.tar")
def image_shard_missing(tmp):
    data = image_data(tmp)
    (data / "val-00000.tar").unlink()
    read_images(data)


@bad_input(ShardError, r"shard .*train-00001\.tar is damaged .*: its sha256 is [0-9a-f]{64}, the index lists")
def image_shard_damaged(tmp):
    data = image_data(tmp)
    flip_bit(data / "train-00001.tar", 530)  # inside the first image
    read_images(data)


@bad_input(ShardError, r"shards do not match the index:\n  shard .*val-00000\.tar is damaged")
def image_shard_damaged_found_by_verify(tmp):
    data = image_data(tmp)
    flip_bit(data / "val-00000.tar", 530)
    verify_shards(data)


@bad_input(UserWarning, r"index\.json lists no sha256 of its shards .*prepare images pack` again")
def image_index_without_checksums(tmp):
    data = image_data(tmp)
    edit_index(data, lambda index: [entry.pop("sha256") for entry in index["splits"].values()])
    read_images(data)


@bad_input(ValueError, r"the model head has 10 classes but the data at .* has 2 \(cat, dog\)")
def image_model_head_of_another_size(tmp):
    ImageDataModule(str(image_data(tmp))).check_num_classes(10)


# --------------------------------------------------------------------------- the command line


@bad_input(
    SystemExit,
    r"unrecognized arguments: --optimizer=torch\.optim\.SGD\n  The optimizer and LR schedule are the "
    r"model's: give them as --model\.init_args\.optimizer and --model\.init_args\.scheduler",
)
def cli_top_level_optimizer(tmp):
    # LightningCLI's own --optimizer replaced the model's optimizer and dropped its schedule silently.
    cli("fit", "--config", LM_DEMO, "--optimizer=torch.optim.SGD", "--print_config")


@bad_input(SystemExit, r"'lr_scheduler.*\n  The optimizer and LR schedule are the model's")
def cli_top_level_lr_scheduler_in_a_config(tmp):
    (tmp / "sched.yaml").write_text("lr_scheduler:\n  class_path: torch.optim.lr_scheduler.StepLR\n")
    cli("fit", "--config", LM_DEMO, "--config", str(tmp / "sched.yaml"), "--print_config")


@bad_input(
    SystemExit, r"(?m)^error: eval_widths\[0\]: width 100 is not valid for layer 0: allowed widths are"
)
def cli_eval_width_that_does_not_exist(tmp):
    cli("fit", "--config", LM_DEMO, "--model.init_args.eval_widths=[100]")


@bad_input(ValueError, r"(?m)^  - eval_widths\[0\]: width 100 is not valid for layer 0")
def cli_debug_shows_the_error_itself(tmp):
    # --debug: the exception and its traceback, not the one-line message
    cli("--debug", "fit", "--config", LM_DEMO, "--model.init_args.eval_widths=[100]")


@bad_input(SystemExit, r"(?m)^error: granularities: width 30 is not valid for layer 0")
def cli_granularity_that_does_not_exist(tmp):
    cli("fit", "--config", LM_DEMO, "--model.init_args.granularities=[128, 30]")


NOT_A_CHECKPOINT = (
    r"(?m)^error: .*{} is not a lit-matmamba training checkpoint: {}.*; pass a \.ckpt written by"
)


@bad_input(
    SystemExit, NOT_A_CHECKPOINT.format("random.ckpt", r"not a PyTorch checkpoint \(invalid load key, .*\)")
)
def ckpt_path_random_bytes(tmp):
    (tmp / "random.ckpt").write_bytes(random.Random(0).randbytes(3000).replace(b"\x80", b"\x81"))
    cli("validate", "--config", LM_DEMO, "--ckpt_path", str(tmp / "random.ckpt"))


@bad_input(SystemExit, NOT_A_CHECKPOINT.format("weights.pt", r"it is a plain state dict \(torch\.save"))
def ckpt_path_plain_state_dict(tmp):
    from lit_matmamba import MatMambaLM

    torch.save(MatMambaLM("lm-tiny").state_dict(), tmp / "weights.pt")
    cli("fit", "--config", LM_DEMO, "--ckpt_path", str(tmp / "weights.pt"))


@bad_input(SystemExit, NOT_A_CHECKPOINT.format("notes.txt", "a text file"))
def ckpt_path_text_file(tmp):
    (tmp / "notes.txt").write_text("step 300: val/loss 4.1\n")
    cli("test", "--config", LM_DEMO, "--ckpt_path", str(tmp / "notes.txt"))


# --------------------------------------------------------------------------- training


@bad_input(
    UserWarning, r"check_finite is false and a training loss was NaN or inf by step 1: training goes on"
)
def training_on_nan_with_check_finite_off(tmp):
    fit(
        tmp,
        tiny_module(check_finite=False),
        callbacks=[break_weights_at(1)],
        max_steps=3,
        log_every_n_steps=2,
    )


@bad_input(UserWarning, r"the weights hold NaN or inf at step 3: no checkpoint is written while they do")
def checkpoint_of_nan_weights(tmp):
    fit(tmp, tiny_module(check_finite=False), callbacks=[break_weights_at(2)], max_steps=3)


def cosine_module():
    from lit_matmamba.training import WarmupCosine

    return tiny_module(scheduler=lambda optimizer: WarmupCosine(optimizer, warmup_steps=1))


@bad_input(
    UserWarning,
    r"resuming at step 4 with another LR schedule than the checkpoint's \(max_steps 4 -> 8\): the "
    r"schedule is rebuilt for the new values, the LR goes from 0\.001 to 0\.00\d+\. To continue the "
    r"checkpoint's schedule instead, set model\.init_args\.scheduler\.init_args\.max_steps to 4",
)
def resume_with_a_larger_max_steps(tmp):
    fit(tmp / "a", cosine_module(), max_steps=4, limit_val_batches=1)
    fit(tmp / "b", cosine_module(), tmp / "a" / "ckpt" / "last.ckpt", max_steps=8, limit_val_batches=1)


def trained_on_text_data(tmp: Path) -> Path:
    """last.ckpt of one step on ``text_data``."""
    data = TextDataModule(str(text_data(tmp)), seq_len=8, batch_size=2, num_workers=0)
    fit(tmp / "run", tiny_module(), data=data, max_steps=1, limit_val_batches=1)
    return tmp / "run" / "ckpt" / "last.ckpt"


CHECKPOINT_ON_OTHER_DATA = (
    r"last\.ckpt was trained on other data: {}\. Check --data, or pass --allow_data_mismatch true"
)


@bad_input(
    ValueError,
    CHECKPOINT_ON_OTHER_DATA.format(
        r"the data's tokenizer has sha256 [0-9a-f]{64}, the checkpoint's [0-9a-f]{64}; "
        r"the data's shards have sha256 [0-9a-f]{64}, the checkpoint's [0-9a-f]{64}"
    ),
)
def validate_on_shards_of_another_tokenizer_of_the_same_size(tmp):
    ckpt = trained_on_text_data(tmp)
    other = TextDataModule(
        str(text_data(tmp / "other", reverse=True)), seq_len=8, batch_size=2, num_workers=0
    )
    fit(tmp / "val", tiny_module(), ckpt, data=other, stage="validate", limit_val_batches=1)


@bad_input(
    ValueError,
    CHECKPOINT_ON_OTHER_DATA.format(
        r"the data's shards have sha256 [0-9a-f]{64}, the checkpoint's [0-9a-f]{64}"
    ),
)
def resume_on_other_shards_of_the_same_tokenizer(tmp):
    ckpt = trained_on_text_data(tmp)
    (tmp / "more.txt").write_text(" ".join(f"w{i}" for i in range(WORDS, 0, -1)))
    text = str(tmp / "more.txt")
    prepare_text(tmp / "more", tmp / "tokenizer.json", train=text, val=text, seq_len=8, progress=False)
    other = TextDataModule(str(tmp / "more"), seq_len=8, batch_size=2, num_workers=0)
    fit(tmp / "resumed", tiny_module(), ckpt, data=other, max_steps=2, limit_val_batches=1)


@bad_input(
    UserWarning,
    r"last\.ckpt was trained on other data: the data's tokenizer .* \(allowed by --allow_data_mismatch\)",
)
def validate_on_other_data_allowed(tmp):
    ckpt = trained_on_text_data(tmp)
    other = TextDataModule(
        str(text_data(tmp / "other", reverse=True)), seq_len=8, batch_size=2, num_workers=0
    )
    module = tiny_module()
    module.allow_data_mismatch = True
    fit(tmp / "val", module, ckpt, data=other, stage="validate", limit_val_batches=1)


# --------------------------------------------------------------------------- the battery


@pytest.mark.parametrize("case, expected, match", CASES)
def test_bad_input(case, expected, match, tmp_path):
    check = pytest.warns if issubclass(expected, Warning) else pytest.raises
    with check(expected, match=match):
        case(tmp_path)


# --------------------------------------------------------------------------- promises kept


def test_last_checkpoint_is_at_the_final_step(tmp_path):
    """A fit that stops at max_steps between validations: last.ckpt is the final step's."""
    fit(tmp_path, tiny_module(), max_steps=3, val_check_interval=2, limit_val_batches=1)
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == 3


def test_a_finite_last_checkpoint_is_not_overwritten_by_nan_weights(tmp_path):
    with pytest.warns(UserWarning, match="the weights hold NaN or inf at step 4"):
        fit(
            tmp_path,
            tiny_module(check_finite=False),
            callbacks=[break_weights_at(2)],
            max_steps=4,
            val_check_interval=2,
            limit_val_batches=1,
        )
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_resume_with_a_larger_max_steps_runs_the_rebuilt_schedule(tmp_path):
    """The LR of every resumed step is the one an uninterrupted fit to the new max_steps uses."""
    import lightning as L

    class LRs(L.Callback):
        def __init__(self):
            self.lrs = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.lrs[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]

    straight, resumed = LRs(), LRs()
    fit(tmp_path / "straight", cosine_module(), callbacks=[straight], max_steps=8, limit_val_batches=1)
    fit(tmp_path / "a", cosine_module(), max_steps=4, limit_val_batches=1)
    with pytest.warns(UserWarning, match="the schedule is rebuilt"):
        last = tmp_path / "a" / "ckpt" / "last.ckpt"
        fit(tmp_path / "b", cosine_module(), last, callbacks=[resumed], max_steps=8, limit_val_batches=1)
    assert list(resumed.lrs) == [4, 5, 6, 7]
    assert resumed.lrs == pytest.approx({k: straight.lrs[k] for k in resumed.lrs}, rel=1e-12)
    assert resumed.lrs[4] > 1.5 * 1e-3  # not the old schedule's floor (0.1 x the peak of 1e-2)
