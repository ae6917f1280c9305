"""Model files: what a training checkpoint records, one loading function for every source, and
standalone model directories (`main.py export`).

`load(path)` reads any of:

- a Lightning checkpoint written by this project's trainer (`*.ckpt`): the plain model is rebuilt
  from the checkpoint's `matmamba` entry, without the YAML;
- the directory of a distributed checkpoint written by the same trainer under
  ModelParallelStrategy (configs/strategy/fsdp.yaml, tp.yaml, fsdp_tp.yaml), recognised by its
  `.metadata`: read on one process, its shards gathered, in the canonical (unsharded) layout;
- a directory written by `save_pretrained` (`main.py export`), recognised by its `matmamba.json`;
- a stock mamba-ssm checkpoint directory (`config.json` + `pytorch_model.bin`, Mamba2 layers).

The `matmamba` entry of a checkpoint (`checkpoint_metadata`, written by
`NestedModule.on_save_checkpoint`), version 3:

    class          the model's class path, e.g. "lit_matmamba.models.lm.MatMambaLM"
    config         the MatMambaConfig fields
    granularities  the widths trained together
    head           None (the head the model builds by default) or {"class_path", "init_args"} of
                   a custom head, as a YAML config gives it; "init_args" is None when the head was
                   built in Python with arguments that cannot be recovered
    tokenizer      None or {"json": the tokenizer.json text, "sha256": of its UTF-8 bytes,
                   "eos_token": the token ending each document, or None}
    seq_len        tokens per training sequence (the longest context trained), or None
    normalize      None or {"mean": [r, g, b], "std": [r, g, b]} of the input images
    data_sha256    None or the identity of the shards trained on (`shards.data_sha256`: the sha256
                   of their sha256 per split)

Entries of version 1 checkpoints (class, config, granularities) and version 2 (all but
data_sha256) load as before; what they lack is None. Resuming, validating, testing or predicting
from a checkpoint on data whose tokenizer or shards differ from those recorded is an error
(`check_checkpoint_data`) unless allowed (`main.py fit --allow_data_mismatch true`). A directory written by `save_pretrained`:

    matmamba.json      {"format": "lit-matmamba", "version": 1, "class", "config" (of the exported
                       model: its `layer_widths` are the widths exported), "width" (those layer
                       widths), "granularities" (the trained widths the export still nests),
                       "head", "tokenizer" (None or {"file", "sha256", "eos_token"}), "seq_len",
                       "normalize", "source"}
    model.safetensors  the state dict, mamba-ssm names and layout (a tied `lm_head.weight` is left
                       out, as Hugging Face does)
    tokenizer.json     language models whose checkpoint recorded a tokenizer
    config.json, pytorch_model.bin
                       language models of one width with the default head: what stock mamba-ssm's
                       `MambaLMHeadModel.from_pretrained(dir)` reads (`models/interop.py`)
    config.json        vision models: timm's hub layout (architecture, num_classes, num_features,
                       global_pool, pretrained_cfg with input_size, mean, std, classifier)

Every directory is written to a temporary directory beside its destination and renamed into
place, so a failed export leaves nothing behind; an existing destination is an error.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import json
import os
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lit_matmamba.models import MatMambaConfig, MatMambaLM, MatMambaVision, NestedModel
from lit_matmamba.models.config import Width

META_FILE = "matmamba.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
FORMAT_NAME = "lit-matmamba"
FORMAT_VERSION = 1
CHECKPOINT_VERSION = 3
EOS_TOKEN = "<|endoftext|>"


# Writing directories ---------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty temporary directory beside `path`, renamed to `path` when the block ends
    without an error and removed otherwise. `path` must not exist."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; remove it or choose another directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():  # created meanwhile by someone else
            raise FileExistsError(f"{path} exists; remove it or choose another directory")
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# What a model is ------------------------------------------------------------------------------
@dataclass
class Pretrained:
    """A plain-PyTorch model with what deploying it needs: the widths it was trained at, how to
    rebuild its head, its tokenizer, the context it was trained on. `load` returns one; wrap a
    model built in Python as `Pretrained(model)` to `save` it."""

    model: NestedModel
    granularities: list[int] | None = None  # None: model.config.default_granularities()
    head: dict[str, Any] | None = None  # a custom head's {"class_path", "init_args"}; None: default
    tokenizer_json: str | None = None
    eos_token: str | None = None
    seq_len: int | None = None
    normalize: dict[str, list[float]] | None = None
    data: dict[str, Any] | None = None  # the data module's hyperparameters saved in the checkpoint
    source: str = ""

    def __post_init__(self) -> None:
        if self.granularities is None:
            self.granularities = list(self.model.config.default_granularities())
        if self.head is None:
            self.head = head_spec(self.model)

    @property
    def is_language_model(self) -> bool:
        return isinstance(self.model, MatMambaLM)

    def tokenizer(self) -> Any:
        """The `tokenizers.Tokenizer`, or None when none was recorded."""
        if self.tokenizer_json is None:
            return None
        from tokenizers import Tokenizer

        return Tokenizer.from_str(self.tokenizer_json)

    def eos_token_id(self) -> int | None:
        tokenizer = self.tokenizer()
        if tokenizer is None or self.eos_token is None:
            return None
        return tokenizer.token_to_id(self.eos_token)

    def save(self, path: str | os.PathLike, width: Width = None) -> Path:
        """Write the sub-model of `width` as a standalone directory (module docstring); returns it."""
        return save_pretrained(self, path, width)


def head_spec(model: nn.Module) -> dict[str, Any] | None:
    """None when `model` has the head it builds by default, else the custom head as
    {"class_path", "init_args"}: the arguments of an `nn.Linear` are read off it; those of any
    other head built in Python are unknown (None). A head from a YAML config is recorded from the
    config instead (`NestedModule.head_spec`)."""
    custom = model.custom_head() if isinstance(model, NestedModel) else None
    if custom is None:
        return None
    init_args = None
    if type(custom) is nn.Linear:
        init_args = dict(
            in_features=custom.in_features, out_features=custom.out_features, bias=custom.bias is not None
        )
    return {"class_path": f"{type(custom).__module__}.{type(custom).__qualname__}", "init_args": init_args}


def build_head(spec: dict[str, Any]) -> nn.Module:
    """Instantiate a head from {"class_path", "init_args"} as LightningCLI would (nested class
    paths included)."""
    if spec.get("init_args") is None:
        raise ValueError(
            f"the model's head ({spec['class_path']}) was built in Python, so its constructor arguments "
            "were not recorded: pass the head (load_model(path, head=...)), or build it in the YAML "
            "config (class_path/init_args), or set NestedModule.head_spec before training"
        )
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--head", type=nn.Module)
    try:
        config = parser.parse_object({"head": spec})
        instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
        return instantiate(config).head
    except Exception as err:
        raise ValueError(f"cannot build the recorded head {spec}: {err}") from None


# Checkpoints ----------------------------------------------------------------------------------
def checkpoint_metadata(
    model: NestedModel,
    granularities: list[int],
    head: dict[str, Any] | None = None,
    datamodule: Any = None,
    cls: type | None = None,
) -> dict[str, Any]:
    """The `matmamba` entry of a training checkpoint (module docstring). `head`: the custom head's
    spec when known from the config (else read off the model, `head_spec`); `datamodule`: the
    trainer's data module, whose tokenizer, sequence length and image normalisation are recorded
    when it has them (`TextDataModule.tokenizer_path`, `seq_len`; `ImageDataModule` mean/std);
    `cls`: the model's own class where `type(model)` is a sharding wrapper's (FSDP2 gives the
    modules it shards a class of its own; `training.parallel.model_class`)."""
    cls = type(model) if cls is None else cls
    custom = head_spec(model)  # None for the default head
    if custom is not None and head is not None:
        custom = head  # the config's spec: its arguments are known
    meta: dict[str, Any] = {
        "version": CHECKPOINT_VERSION,
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "config": model.config.to_dict(),
        "granularities": list(granularities),
        "head": custom,
        "tokenizer": None,
        "seq_len": None,
        "normalize": None,
        "data_sha256": None,
    }
    if datamodule is None:
        return meta
    with contextlib.suppress(RuntimeError, OSError, KeyError):  # data not set up: nothing to record
        meta["data_sha256"] = getattr(datamodule, "data_sha256", None)
    if isinstance(getattr(datamodule, "seq_len", None), int):
        meta["seq_len"] = datamodule.seq_len
    if hasattr(datamodule, "tokenizer_path"):
        with contextlib.suppress(RuntimeError, OSError, KeyError):  # data not set up: nothing to record
            text, digest = _read_tokenizer(datamodule.tokenizer_path)
            index = getattr(datamodule, "index", {})
            meta["tokenizer"] = {"json": text, "sha256": digest, "eos_token": index.get("eos_token")}
    hparams = getattr(datamodule, "hparams", {})
    if isinstance(model, MatMambaVision) and "mean" in hparams and "std" in hparams:
        meta["normalize"] = {"mean": list(hparams["mean"]), "std": list(hparams["std"])}
    return meta


def check_checkpoint_data(
    meta: dict[str, Any] | None, datamodule: Any, where: str = "the checkpoint", allow: bool = False
) -> None:
    """Raise a ValueError naming both sha256 when `datamodule`'s tokenizer or shards are not those
    the checkpoint (its `matmamba` entry, `meta`) was trained on; `allow`: warn instead. What either
    side does not know (an older checkpoint, an index without checksums, no data module) is not
    compared."""
    if not meta or datamodule is None:
        return
    problems = []
    with contextlib.suppress(RuntimeError, OSError, KeyError, AttributeError):
        recorded, current = (meta.get("tokenizer") or {}).get("sha256"), datamodule.tokenizer_hash
        if recorded and current and recorded != current:
            problems.append(f"the data's tokenizer has sha256 {current}, the checkpoint's {recorded}")
    with contextlib.suppress(RuntimeError, OSError, KeyError, AttributeError):
        recorded, current = meta.get("data_sha256"), datamodule.data_sha256
        if recorded and current and recorded != current:
            problems.append(f"the data's shards have sha256 {current}, the checkpoint's {recorded}")
    if not problems:
        return
    found = f"{where} was trained on other data: {'; '.join(problems)}"
    if allow:
        warnings.warn(f"{found} (allowed by --allow_data_mismatch)", stacklevel=2)
        return
    raise ValueError(
        f"{found}. Check --data, or pass --allow_data_mismatch true to run on this data anyway "
        f"(in Python: module.allow_data_mismatch = True)"
    )


@functools.lru_cache(maxsize=4)
def _read_tokenizer(location: str) -> tuple[str, str]:
    """(text, sha256) of a tokenizer.json at a path or a URL that WebDataset opens."""
    if "://" in location or location.startswith("pipe:"):
        from webdataset.gopen import gopen

        with gopen(location, "rb") as f:
            data = f.read()
    else:
        data = Path(location).read_bytes()
    return data.decode("utf-8"), hashlib.sha256(data).hexdigest()


def read_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """The dict of a training checkpoint written by this project's trainer (the one place such a
    checkpoint is opened), or a ValueError "PATH is not a lit-matmamba training checkpoint: WHAT IT
    IS" for anything else (a text file, another binary, a plain state dict, another module's
    Lightning checkpoint). `mmap`: map the tensors instead of reading them (cheap, for a look at the
    entries of a big file).

    `path` is a file, or the directory of a distributed checkpoint (what ModelParallelStrategy
    writes under FSDP2 or tensor parallelism), whose shards are gathered into the whole, canonical
    `state_dict` on the CPU, then moved to `map_location` (its optimizer state is left out;
    `training.parallel.load_full_checkpoint`); with `mmap`, no shard is read and the `state_dict`
    holds tensors on the meta device."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    fix = "pass a .ckpt written by `main.py fit` (e.g. <log dir>/checkpoints/last.ckpt)"
    if path.is_dir():
        if not (path / ".metadata").is_file():  # torch.distributed.checkpoint's index of the shards
            raise FileNotFoundError(
                f"{path} is neither a checkpoint file, an exported model ({META_FILE}), a mamba-ssm "
                "checkpoint (config.json) nor a distributed checkpoint (.metadata)"
            )
        from lit_matmamba.training.parallel.checkpoint import load_full_checkpoint

        ckpt = load_full_checkpoint(path, tensors=not mmap)  # mmap: a look, no shard is read
        if not mmap and torch.device(map_location).type != "cpu":
            ckpt["state_dict"] = {k: v.to(map_location) for k, v in ckpt["state_dict"].items()}
    else:
        try:
            mmap = mmap and zipfile.is_zipfile(path)  # files of torch.save's legacy format do not map
            ckpt = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
        except OSError:
            raise
        except Exception as err:  # whatever unpickling arbitrary bytes raises
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            what = "a text file" if _is_text(path) else f"not a PyTorch checkpoint ({first})"
            raise ValueError(f"{path} is not a lit-matmamba training checkpoint: {what}; {fix}") from None
    what = None
    if not isinstance(ckpt, dict):
        what = f"it holds a {type(ckpt).__name__}, not a checkpoint's dict"
    elif ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        what = "it is a plain state dict (torch.save(model.state_dict())), without the training state"
    elif "state_dict" in ckpt and "pytorch-lightning_version" in ckpt and "matmamba" not in ckpt:
        what = "a Lightning checkpoint written by another module (it has no 'matmamba' entry)"
    elif "state_dict" not in ckpt or "matmamba" not in ckpt:
        what = f"a dict without a training checkpoint's entries (it has {sorted(map(str, ckpt))[:6]})"
    if what is not None:
        raise ValueError(f"{path} is not a lit-matmamba training checkpoint: {what}; {fix}")
    return ckpt


def _is_text(path: Path) -> bool:
    """Whether the start of `path` reads as UTF-8 text (no NUL byte)."""
    with open(path, "rb") as f:
        head = f.read(4096)
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 4:  # not just a character cut at the end
            return False
    return b"\0" not in head


def load(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", head: nn.Module | None = None
) -> Pretrained:
    """The model at `path` (a training checkpoint, an exported directory or a mamba-ssm
    checkpoint directory; module docstring) with its metadata, on `map_location`. `head`: the
    model's head, for checkpoints whose custom head was built in Python."""
    path = Path(path)
    if path.is_dir():
        if (path / META_FILE).is_file():
            return _load_directory(path, map_location, head)
        if (path / "config.json").is_file():
            from lit_matmamba.models.interop import load_mamba_ssm

            with torch.device(map_location):
                model = load_mamba_ssm(path)
            tokenizer = path / TOKENIZER_FILE
            pretrained = Pretrained(
                model,
                tokenizer_json=tokenizer.read_text("utf-8") if tokenizer.is_file() else None,
                source=str(path),
            )
            # GPT-NeoX's tokenizer (Mamba's) and this package's default BPE end documents with it.
            if (
                pretrained.tokenizer_json is not None
                and pretrained.tokenizer().token_to_id(EOS_TOKEN) is not None
            ):
                pretrained.eos_token = EOS_TOKEN
            return pretrained
    return from_checkpoint(read_checkpoint(path, map_location), str(path), map_location, head)


def from_checkpoint(
    ckpt: dict[str, Any],
    source: str,
    map_location: str | torch.device = "cpu",
    head: nn.Module | None = None,
) -> Pretrained:
    """The model of a training checkpoint's dict already read (`read_checkpoint`), for a caller
    that needs the checkpoint's other entries too and should not read it twice; `source`: its path."""
    meta = ckpt["matmamba"]
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model = _build(meta, state, map_location, head, source)
    return Pretrained(
        model,
        granularities=list(meta["granularities"]),
        head=meta.get("head"),
        tokenizer_json=(meta.get("tokenizer") or {}).get("json"),
        eos_token=(meta.get("tokenizer") or {}).get("eos_token"),
        seq_len=meta.get("seq_len"),
        normalize=meta.get("normalize"),
        data=ckpt.get("datamodule_hyper_parameters"),
        source=source,
    )


def load_model(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", head: nn.Module | None = None
) -> NestedModel:
    """The plain-PyTorch model at `path` (see `load`; no Lightning needed to use it afterwards)."""
    return load(path, map_location, head).model


def _import(class_path: str) -> type:
    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"cannot import the model class {class_path!r}: {err}") from None


def _config(fields: dict[str, Any]) -> MatMambaConfig:
    fields = dict(fields)
    fields.pop("granularities", None)  # a config field in checkpoints written before 0.2
    return MatMambaConfig(**fields)


def _build(
    meta: dict[str, Any],
    state: dict[str, torch.Tensor],
    map_location: str | torch.device,
    head: nn.Module | None,
    where: str,
) -> NestedModel:
    cls = _import(meta["class"])
    if not (isinstance(cls, type) and issubclass(cls, NestedModel)):
        raise ValueError(f"{where} holds a {meta['class']}, not a MatMamba model")
    if head is None and meta.get("head") is not None:
        head = build_head(meta["head"])
    with torch.device(map_location):
        model = cls(_config(meta["config"]), head=head)
    tied = isinstance(model, MatMambaLM) and model.tied
    if tied:
        state.setdefault("lm_head.weight", state.get("backbone.embedding.weight"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        hint = ""
        if "head" not in meta and any("head" in k for k in [*missing, *unexpected]):
            hint = (
                ": the checkpoint was written before custom heads were recorded; pass the head "
                "(load_model(path, head=...))"
            )
        raise ValueError(
            f"{where}: the weights do not fit a {cls.__name__} built from the recorded config "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}){hint}"
        )
    model.eval()
    return model


def _load_directory(path: Path, map_location: str | torch.device, head: nn.Module | None) -> Pretrained:
    from safetensors.torch import load_file

    try:
        meta = json.loads((path / META_FILE).read_text("utf-8"))
    except ValueError as err:
        raise ValueError(f"{path / META_FILE} is not valid JSON: {err}") from None
    if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path / META_FILE}: format {meta.get('format')!r} version {meta.get('version')!r}; this code "
            f"reads {FORMAT_NAME!r} version {FORMAT_VERSION}"
        )
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: the exported directory is incomplete")
    state = load_file(weights, device=str(torch.device(map_location)))
    model = _build(meta, state, map_location, head, str(path))
    tokenizer_json = eos = None
    if meta.get("tokenizer"):
        data = (path / meta["tokenizer"]["file"]).read_bytes()
        if hashlib.sha256(data).hexdigest() != meta["tokenizer"]["sha256"]:
            raise ValueError(f"{path / meta['tokenizer']['file']} does not match the sha256 in {META_FILE}")
        tokenizer_json, eos = data.decode("utf-8"), meta["tokenizer"].get("eos_token")
    return Pretrained(
        model,
        granularities=meta.get("granularities"),
        head=meta.get("head"),
        tokenizer_json=tokenizer_json,
        eos_token=eos,
        seq_len=meta.get("seq_len"),
        normalize=meta.get("normalize"),
        source=str(path),
    )


# Exporting ------------------------------------------------------------------------------------
def _file_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as contiguous CPU tensors, without a tied `lm_head.weight` (safetensors
    stores no shared tensors)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if isinstance(model, MatMambaLM) and model.tied:
        state.pop("lm_head.weight", None)
    return state


def save_pretrained(pretrained: Pretrained, path: str | os.PathLike, width: Width = None) -> Path:
    """Write the sub-model of `width` (None: the whole model) of `pretrained.model` to the new
    directory `path` (formats in the module docstring); returns `path`."""
    from safetensors.torch import save_file

    model = pretrained.model
    widths = model.config.resolve(width)  # raises ValueError naming the valid widths
    if pretrained.head is not None and pretrained.head.get("init_args") is None:
        build_head(pretrained.head)  # raises the clear error: the head cannot be rebuilt
    sub = model.extract(widths) if widths != list(model.config.layer_widths) else model
    held = min(widths)
    tokenizer = None
    if pretrained.tokenizer_json is not None:
        digest = hashlib.sha256(pretrained.tokenizer_json.encode("utf-8")).hexdigest()
        tokenizer = {"file": TOKENIZER_FILE, "sha256": digest, "eos_token": pretrained.eos_token}
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "class": f"{type(sub).__module__}.{type(sub).__qualname__}",
        "config": sub.config.to_dict(),
        "width": widths,
        "granularities": [g for g in pretrained.granularities or [] if g <= held],
        "head": pretrained.head,
        "tokenizer": tokenizer,
        "seq_len": pretrained.seq_len,
        "normalize": pretrained.normalize,
        "source": pretrained.source,
    }
    text = json.dumps(meta, indent=2)  # before writing anything: a head spec may not be JSON
    with atomic_directory(path) as tmp:
        save_file(_file_state(sub), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            (tmp / TOKENIZER_FILE).write_text(pretrained.tokenizer_json, "utf-8")
        if isinstance(sub, MatMambaLM) and len(set(widths)) == 1 and pretrained.head is None:
            from lit_matmamba.models.interop import write_mamba_ssm

            write_mamba_ssm(sub, tmp)
        elif isinstance(sub, MatMambaVision):
            (tmp / "config.json").write_text(json.dumps(timm_config(pretrained, sub), indent=2))
        (tmp / META_FILE).write_text(text)
    return Path(path)


def timm_config(pretrained: Pretrained, model: MatMambaVision) -> dict[str, Any]:
    """config.json of a vision model in timm's hub layout."""
    from lit_matmamba.data.vision import IMAGENET_MEAN, IMAGENET_STD

    cfg = model.config
    norm = pretrained.normalize or {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    classifier = "head.fc" if pretrained.head is None else "head"
    return {
        "architecture": "matmamba_vision",
        "num_classes": cfg.num_classes,
        "num_features": cfg.d_model,
        "global_pool": cfg.pool,
        "model_args": {"layer_widths": list(cfg.layer_widths)},
        "pretrained_cfg": {
            "input_size": [cfg.in_chans, cfg.img_size, cfg.img_size],
            "mean": norm["mean"],
            "std": norm["std"],
            "num_classes": cfg.num_classes,
            "classifier": classifier,
            "first_conv": "patch_embed",
        },
    }


__all__ = [
    "Pretrained",
    "atomic_directory",
    "build_head",
    "check_checkpoint_data",
    "checkpoint_metadata",
    "from_checkpoint",
    "head_spec",
    "load",
    "load_model",
    "read_checkpoint",
    "save_pretrained",
]
