"""Deploying sub-models: checkpoints that rebuild themselves, export, decoding, search, lm-eval."""

from __future__ import annotations

import json
import random
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import fit_one_step
from torch import nn
from torch.utils.data import DataLoader

from lit_matmamba import MatMambaConfig, MatMambaLM, MatMambaVision
from lit_matmamba.cli import main
from lit_matmamba.data.tokenizer import train_bpe_tokenizer
from lit_matmamba.deploy.common import parse_width
from lit_matmamba.deploy.search import evolve, pareto, parse_budget, rule_widths
from lit_matmamba.io import Pretrained, load, load_model
from lit_matmamba.models.interop import load_mamba_ssm
from lit_matmamba.models.lm import sample
from lit_matmamba.training import LanguageModeling

F64 = torch.float64
TEXT = (
    "When shall we three meet again, in thunder, lightning, or in rain? When the hurlyburly's done, "
    "when the battle's lost and won. That will be ere the set of sun. Where the place? Upon the heath. "
)
WIDTHS = [None, 16, 8, [32, 4, 16]]
WIDTH_IDS = ["full", "w16", "w8", "mixnmatch"]


def lm_config(**kw) -> MatMambaConfig:
    base = dict(d_model=32, n_layer=3, vocab_size=320, d_state=8, headdim=8, chunk_size=8)
    return MatMambaConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tokenizer_json() -> str:
    return train_bpe_tokenizer([TEXT] * 20, vocab_size=300).to_str()


@pytest.fixture
def lm() -> MatMambaLM:
    torch.manual_seed(0)
    return MatMambaLM(lm_config()).double().eval()


def argmax_by_forward(model: MatMambaLM, prompt: list[int], steps: int, width) -> list[int]:
    """Greedy decoding the slow way: the whole sequence through the forward at every step."""
    seq = list(prompt)
    for _ in range(steps):
        logits = model(torch.tensor([seq]), width)[0, -1, : model.config.vocab_size]
        seq.append(int(logits.argmax()))
    return seq


# Decoding -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("width", WIDTHS, ids=WIDTH_IDS)
def test_greedy_generate_equals_stepwise_argmax_for_prompts_of_different_lengths(lm, width):
    prompts = [[5, 9, 2, 7, 7, 1, 30], [11], [3, 3, 8, 4], [40, 41, 42, 43]]
    out = lm.generate([torch.tensor(p) for p in prompts], 9, width, temperature=0)
    for prompt, row in zip(prompts, out):
        assert row.tolist() == argmax_by_forward(lm, prompt, 9, width)
    # a tensor of prompts of one length gives the same rows
    same = lm.generate(torch.tensor(prompts[2:]), 9, width, temperature=0)
    assert same.tolist() == [r.tolist() for r in out[2:]]


def test_generation_stops_at_eos(lm):
    prompts = [torch.tensor([5, 9, 2]), torch.tensor([11, 12])]
    free = lm.generate(prompts, 6, 16, temperature=0)
    eos = int(free[0][3 + 2])  # the third new token of the first prompt
    out = lm.generate(prompts, 6, 16, temperature=0, eos_token_id=eos)
    first = free[0].tolist()
    assert out[0].tolist() == first[: first.index(eos, 3) + 1]  # stops right after its first EOS
    padded = lm.generate(torch.stack([prompts[0], prompts[0]]), 6, 16, temperature=0, eos_token_id=eos)
    assert padded.shape == (2, 9) and (padded[:, len(out[0]) :] == eos).all()


def test_sampling_respects_top_k_top_p_and_the_seed():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample(logits, 0.0), torch.zeros(2000, dtype=torch.long))
    assert set(sample(logits, 1.0, top_k=2, generator=g).tolist()) == {0, 1}
    assert set(sample(logits, 1.0, top_p=0.7, generator=g).tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(sample(logits, 1.0, top_p=0.5, generator=g).tolist()) == {0}
    drawn = sample(logits, 1.0, generator=g)
    assert set(drawn.tolist()) == {0, 1, 2, 3} and abs(float((drawn == 0).float().mean()) - 0.5) < 0.05
    a = sample(logits, 0.7, top_k=3, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, sample(logits, 0.7, top_k=3, generator=torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="top_p"):
        sample(logits, 1.0, top_p=0.0)


# Export ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("width", WIDTHS, ids=WIDTH_IDS)
def test_export_round_trip(lm, width, tokenizer_json, tmp_path):
    pretrained = Pretrained(lm, tokenizer_json=tokenizer_json, eos_token="<|endoftext|>", seq_len=64)
    path = pretrained.save(tmp_path / "out", width)
    files = {p.name for p in path.iterdir()}
    assert {"matmamba.json", "model.safetensors", "tokenizer.json"} <= files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    ids = torch.randint(0, 320, (2, 13))
    loaded = MatMambaLM.from_pretrained(path)
    torch.testing.assert_close(loaded.double()(ids), lm(ids, width))
    assert loaded.num_params() == lm.num_params(width) < lm.num_params() or width is None
    back = load(path)
    assert back.tokenizer().encode("thunder").ids == pretrained.tokenizer().encode("thunder").ids
    assert (back.seq_len, back.eos_token) == (64, "<|endoftext|>")
    uniform = not isinstance(width, list)
    assert ({"config.json", "pytorch_model.bin"} <= files) == uniform  # mamba-ssm's format when it can
    if uniform:
        torch.testing.assert_close(load_mamba_ssm(path).double()(ids), lm(ids, width))
        config = json.loads((path / "config.json").read_text())
        assert config["ssm_cfg"]["layer"] == "Mamba2" and config["n_layer"] == 3
    # an export still nests the narrower widths, and says which were trained
    assert back.granularities == [g for g in (32, 16, 8, 4) if g <= min(lm.config.resolve(width))]


def test_export_loads_into_stock_mamba_ssm(lm, tmp_path):
    """Stock mamba-ssm builds the exported model and loads its weights strictly (on the CPU)."""
    import sys
    import types

    from lit_matmamba.kernels.mamba_ssm_compat import get_mamba_chunk_scan_combined

    try:
        get_mamba_chunk_scan_combined()
        sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    except Exception as err:  # mamba-ssm, or the transformers it imports, is not installed
        pytest.skip(f"stock mamba-ssm's LM cannot be imported here: {err}")
    path = lm.float().save_pretrained(tmp_path / "w16", 32)
    stock = MambaLMHeadModel.from_pretrained(str(path), device="cpu")
    mine = stock.state_dict()
    theirs = torch.load(path / "pytorch_model.bin")
    assert set(mine) == set(theirs) and all(mine[k].shape == theirs[k].shape for k in mine)


def test_vision_export_round_trip(tmp_path):
    torch.manual_seed(0)
    model = MatMambaVision(MatMambaConfig.from_name("vision-tiny", num_classes=7)).eval()
    images = torch.randn(2, 3, 32, 32)
    for width in (32, [64, 16]):
        path = Pretrained(model, normalize={"mean": [0.1] * 3, "std": [0.3] * 3}).save(
            tmp_path / str(width), width
        )
        torch.testing.assert_close(MatMambaVision.from_pretrained(path)(images), model(images, width))
        timm = json.loads((path / "config.json").read_text())
        assert timm["num_classes"] == 7 and timm["pretrained_cfg"]["mean"] == [0.1] * 3
        assert timm["pretrained_cfg"]["input_size"] == [3, 32, 32]
    with pytest.raises(ValueError, match="not a MatMambaLM"):
        MatMambaLM.from_pretrained(path)


def test_export_refuses_bad_input_and_writes_nothing(lm, tmp_path):
    with pytest.raises(ValueError, match="allowed widths are multiples of 4"):
        Pretrained(lm).save(tmp_path / "bad", 6)
    with pytest.raises(ValueError, match="needs 3 entries"):
        Pretrained(lm).save(tmp_path / "bad", [16, 8])
    (tmp_path / "there").mkdir()
    with pytest.raises(FileExistsError, match="exists"):
        Pretrained(lm).save(tmp_path / "there", 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["there"]


# Checkpoints ----------------------------------------------------------------------------------
class TokenData(L.LightningDataModule):
    """Random token batches with what `TextDataModule` tells a checkpoint: a tokenizer file, its
    end-of-text token and the training sequence length."""

    def __init__(self, tokenizer_file: str = "", seq_len: int = 24, batches: int = 12, vocab_size: int = 300):
        super().__init__()
        self.save_hyperparameters()
        self.seq_len = seq_len
        self.tokens = torch.randint(
            0, vocab_size, (batches * 4, seq_len), generator=torch.Generator().manual_seed(0)
        )

    @property
    def tokenizer_path(self) -> str:
        return self.hparams.tokenizer_file

    @property
    def index(self) -> dict:
        return {"eos_token": "<|endoftext|>"}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.tokens, batch_size=4)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.tokens, batch_size=4)

    test_dataloader = val_dataloader


class TwoLayerHead(nn.Module):
    """A custom LM head: (B, L, in_features) -> (B, L, vocab_size)."""

    def __init__(self, in_features: int, vocab_size: int, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.Tanh(), nn.Linear(hidden, vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.fixture(scope="module")
def lm_checkpoint(tmp_path_factory, tokenizer_json) -> Path:
    """A tiny language model trained one step, with the metadata of a text data module."""
    root = tmp_path_factory.mktemp("lm")
    (root / "tokenizer.json").write_text(tokenizer_json)
    torch.manual_seed(0)
    module = LanguageModeling(MatMambaLM(lm_config()), granularities=[32, 16, 8, 4])
    return fit_one_step(module, TokenData(str(root / "tokenizer.json")), root / "lm.ckpt")


def test_checkpoint_records_what_deploying_needs(lm_checkpoint, tokenizer_json):
    import hashlib

    meta = torch.load(lm_checkpoint, weights_only=False)["matmamba"]
    assert meta["version"] == 3 and meta["granularities"] == [32, 16, 8, 4] and meta["head"] is None
    assert meta["tokenizer"]["json"] == tokenizer_json and meta["seq_len"] == 24
    assert meta["tokenizer"]["sha256"] == hashlib.sha256(tokenizer_json.encode()).hexdigest()
    assert meta["tokenizer"]["eos_token"] == "<|endoftext|>"
    assert meta["data_sha256"] is None  # a data module without shards (the battery checks shards)
    pretrained = load(lm_checkpoint)
    assert pretrained.eos_token_id() == pretrained.tokenizer().token_to_id("<|endoftext|>") == 0
    assert pretrained.data["seq_len"] == 24  # the data module's hyperparameters, for `search`


def test_custom_head_from_yaml_travels_with_the_checkpoint(tmp_path):
    """The issue's report: a head given as class_path/init_args in the config; load_model, export
    and generation rebuild it from the checkpoint alone."""
    from lit_matmamba.cli import MatMambaCLI
    from lit_matmamba.training import NestedModule

    repo = Path(__file__).resolve().parents[1]
    args = [
        "--config",
        str(repo / "configs/lm_demo.yaml"),
        "--model.init_args.model.init_args.config",
        json.dumps(lm_config().to_dict()),
        "--model.init_args.model.init_args.head",
        json.dumps(
            {"class_path": f"{__name__}.TwoLayerHead", "init_args": {"in_features": 32, "vocab_size": 320}}
        ),
        "--model.init_args.granularities",
        "[32, 16]",
        "--model.init_args.scheduler",
        "null",
    ]
    cli = MatMambaCLI(
        NestedModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=False,
    )
    assert cli.model.head_spec["class_path"] == f"{__name__}.TwoLayerHead"
    ckpt = fit_one_step(cli.model, TokenData(), tmp_path / "head.ckpt")
    model = cli.model.model.eval()
    loaded = load_model(ckpt)
    ids = torch.randint(0, 320, (2, 9))
    assert type(loaded.lm_head) is TwoLayerHead
    torch.testing.assert_close(loaded(ids, 16), model(ids, 16))
    path = load(ckpt).save(tmp_path / "export", 16)
    assert not (path / "config.json").exists()  # mamba-ssm has no place for a custom head
    torch.testing.assert_close(MatMambaLM.from_pretrained(path)(ids), model(ids, 16))
    prompt = [3, 1, 4, 1, 5]
    assert MatMambaLM.from_pretrained(path).generate([torch.tensor(prompt)], 5, temperature=0)[
        0
    ].tolist() == (argmax_by_forward(model, prompt, 5, 16))


def test_heads_built_in_python(tmp_path):
    torch.manual_seed(0)
    data = TokenData()
    linear = MatMambaLM(lm_config(tie_embeddings=False, vocab_size=300), head=nn.Linear(32, 300, bias=True))
    loaded = load_model(
        fit_one_step(LanguageModeling(linear, granularities=[32, 8]), data, tmp_path / "a.ckpt")
    )
    ids = torch.randint(0, 300, (2, 7))
    torch.testing.assert_close(
        loaded(ids, 8), linear.eval()(ids, 8)
    )  # an nn.Linear's arguments are read off it
    custom = MatMambaLM(lm_config(), head=TwoLayerHead(32, 320))
    ckpt = fit_one_step(LanguageModeling(custom, granularities=[32, 8]), data, tmp_path / "b.ckpt")
    with pytest.raises(ValueError, match=r"built in Python.*head=\.\.\."):
        load_model(ckpt)
    loaded = load_model(ckpt, head=TwoLayerHead(32, 320))
    torch.testing.assert_close(loaded(ids, 8), custom.eval()(ids, 8))


def test_old_checkpoints_still_load(lm_checkpoint, tmp_path):
    """Version 1 checkpoints (class, config, granularities only) load as before."""
    ckpt = torch.load(lm_checkpoint, weights_only=False)
    ckpt["matmamba"] = {k: ckpt["matmamba"][k] for k in ("class", "config", "granularities")}
    torch.save(ckpt, tmp_path / "v1.ckpt")
    old = load(tmp_path / "v1.ckpt")
    assert old.tokenizer() is None and old.seq_len is None
    ids = torch.randint(0, 320, (1, 5))
    torch.testing.assert_close(old.model(ids, 8), load_model(lm_checkpoint)(ids, 8))


def test_load_refuses_other_files(tmp_path):
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.ckpt is not a lit-matmamba training checkpoint: a text file"):
        load(tmp_path / "notes.ckpt")
    torch.save({"state_dict": {"layer.weight": torch.zeros(2)}}, tmp_path / "other.ckpt")
    with pytest.raises(
        ValueError, match="other.ckpt is not a lit-matmamba training checkpoint: a dict without"
    ):
        load(tmp_path / "other.ckpt")
    with pytest.raises(FileNotFoundError, match="neither a checkpoint file, an exported model"):
        load(tmp_path)
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.ckpt")


# The commands -----------------------------------------------------------------------------------
def run_command(args: list[str], capsys) -> str:
    main(args)
    return capsys.readouterr().out


def command_error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code not in (0, None)
    return str(done.value.code) + capsys.readouterr().err


FLAGS = {
    "export": ["--ckpt_path", "--width", "--output"],
    "generate": ["--ckpt_path", "--model", "--width", "--prompt", "--prompts", "--top_p", "--seed"],
    "search": ["--ckpt_path", "--budget", "--data", "--choices", "--final_split"],
    "lm_eval": ["--model", "--model_args", "--tasks", "--include_path"],  # lm-eval's own command line
}


@pytest.mark.parametrize("command", list(FLAGS))
def test_commands_explain_themselves(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code in (0, None)
    out = capsys.readouterr().out
    assert all(flag in out for flag in FLAGS[command]), out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert f"    {command}  " in capsys.readouterr().out  # listed beside fit, validate, ...


def test_width_on_the_command_line(lm):
    cfg = lm.config
    assert parse_width("D/4", cfg) == 8 and parse_width("D", cfg) == 32 and parse_width("16", cfg) == 16
    assert parse_width("32,4,16", cfg) == [32, 4, 16] == parse_width("32:4:16", cfg)
    assert parse_width([8, 8, 8], cfg) == 8 and parse_width(None, cfg) is None
    with pytest.raises(ValueError, match="not valid"):
        parse_width("D/16", cfg)  # 2: fewer than whole heads
    with pytest.raises(ValueError, match="not divisible"):
        parse_width("D/5", cfg)
    with pytest.raises(ValueError, match="give an int"):
        parse_width("wide", cfg)


def test_export_and_generate_commands(lm_checkpoint, tmp_path, capsys):
    out = run_command(
        ["export", "--ckpt_path", str(lm_checkpoint), "--width", "16", "--output", str(tmp_path / "w16")],
        capsys,
    )
    assert "MambaLMHeadModel.from_pretrained" in out
    model = load_model(lm_checkpoint)
    tokenizer = load(lm_checkpoint).tokenizer()
    prompt = "When shall we"
    ids = tokenizer.encode(prompt).ids
    greedy = argmax_by_forward(model, ids, 8, 16)[len(ids) :]
    expected = tokenizer.decode(greedy[: greedy.index(0)] if 0 in greedy else greedy)  # EOS (id 0) ends it
    for source in (["--ckpt_path", str(lm_checkpoint)], ["--model", str(tmp_path / "w16")]):
        out = run_command(
            ["generate", *source, "--width", "16", "--prompt", prompt, "--max_new_tokens", "8"], capsys
        )
        assert out.startswith(prompt + expected + "\n") and "tokens/s" in out
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("When shall\nUpon the heath, where the place\nthunder\n")
    out = run_command(
        [
            "generate",
            "--ckpt_path",
            str(lm_checkpoint),
            "--prompts",
            str(prompts),
            "--width",
            "[32,4,16]",
            "--temperature",
            "0.8",
            "--top_p",
            "0.9",
        ],
        capsys,
    )
    assert out.count("--- prompt") == 3 and "3 prompt(s)" in out


def test_commands_refuse_bad_input_in_one_line(lm_checkpoint, tmp_path, capsys):
    ckpt = str(lm_checkpoint)
    assert "allowed widths" in command_error(
        ["export", "--ckpt_path", ckpt, "--width", "6", "--output", str(tmp_path / "x")], capsys
    )
    assert not (tmp_path / "x").exists()
    (tmp_path / "taken").mkdir()
    assert "exists" in command_error(
        ["export", "--ckpt_path", ckpt, "--output", str(tmp_path / "taken")], capsys
    )
    assert "empty" in command_error(["generate", "--ckpt_path", ckpt, "--prompt", ""], capsys)
    long_prompt = "thunder " * 40
    assert "longest context" in command_error(
        ["generate", "--ckpt_path", ckpt, "--prompt", long_prompt], capsys
    )
    assert "either --ckpt_path" in command_error(["generate", "--prompt", "hi"], capsys)
    (tmp_path / "notes.ckpt").write_text("hello")
    assert "not a lit-matmamba training checkpoint: a text file" in command_error(
        ["generate", "--ckpt_path", str(tmp_path / "notes.ckpt"), "--prompt", "hi"], capsys
    )
    error = command_error(
        ["search", "--ckpt_path", ckpt, "--budget", "params=1000", "--output", str(tmp_path / "s")], capsys
    )
    assert "no width meets the budget" in error and "costs" in error and not (tmp_path / "s").exists()
    assert "give params=N" in command_error(["search", "--ckpt_path", ckpt, "--budget", "memory=3"], capsys)
    assert "Traceback" not in capsys.readouterr().err


def test_generate_refuses_a_vision_model(tmp_path, capsys):
    torch.manual_seed(0)
    vision = MatMambaVision(MatMambaConfig.from_name("vision-tiny"))
    path = vision.save_pretrained(tmp_path / "v")
    assert "not a language model" in command_error(
        ["generate", "--model", str(path), "--prompt", "hi"], capsys
    )


# Search -----------------------------------------------------------------------------------------
def test_budgets_parse():
    assert parse_budget("params=2.5M") == ("params", 2.5e6) and parse_budget("latency_ms=4") == (
        "latency_ms",
        4.0,
    )
    assert parse_budget("flops = 3e6") == ("flops", 3e6)
    for bad in ("params", "speed=3", "params=-1", "params=x"):
        with pytest.raises(ValueError):
            parse_budget(bad)


def test_pareto_keeps_what_nothing_cheaper_beats():
    points = [(1, 5.0), (2, 4.0), (2, 3.0), (3, 3.5), (4, 1.0), (5, 1.0)]
    assert pareto(points) == [0, 2, 4]


@pytest.mark.parametrize("n_layer, strategy", [(3, "exhaustive"), (10, "evolution")])
def test_evolve_meets_the_budget_and_finds_good_widths(n_layer, strategy):
    """A synthetic problem with a known answer: the score rewards width in early layers more."""
    space = [[1, 2, 4, 8]] * n_layer
    weights = [n_layer - i for i in range(n_layer)]

    def cost(w):
        return sum(w)

    def score(w):
        return -sum(a * b**0.5 for a, b in zip(weights, w))

    budget = 3 * n_layer
    archive, used = evolve(space, cost, score, budget, population=12, generations=15, rng=random.Random(1))
    assert used == strategy and all(cost(w) <= budget for w in archive)
    best = min(archive, key=archive.get)
    import itertools

    if n_layer <= 4:
        optimum = min((w for w in itertools.product(*space) if cost(w) <= budget), key=score)
        assert best == optimum
    else:  # evolution beats every uniform width under the budget and most random widths
        uniform = min(score((w,) * n_layer) for w in (1, 2) if w * n_layer <= budget)
        assert score(best) < uniform
    with pytest.raises(ValueError, match="smallest.*costs"):
        evolve(space, cost, score, n_layer - 1)


def test_rules():
    assert rule_widths("uniform", [16, 32], 2) == [(32, 32), (16, 16)]
    assert (32, 16, 16) in rule_widths("pyramid", [32, 16], 3) and (16, 16, 32) in rule_widths(
        "inverted_pyramid", [32, 16], 3
    )


@pytest.mark.parametrize("budget", ["params=20000", "flops=50000", "latency_ms=1000"])
def test_search_on_a_trained_checkpoint(lm_checkpoint, tmp_path, budget, capsys):
    from lit_matmamba.deploy.search import search

    kind, limit = parse_budget(budget)
    result = search(
        str(lm_checkpoint),
        budget,
        output=str(tmp_path / "out"),
        data=TokenData(),
        population=6,
        generations=3,
        proxy_batches=2,
        confirm_batches=3,
        final_split="test",
        seq_len=24,
    )
    frontier = result["frontier"]
    assert result["chosen"][kind] <= limit and result["chosen"]["width"] == frontier[-1]["width"]
    costs, losses = [p[kind] for p in frontier], [p["confirm"] for p in frontier]
    assert costs == sorted(costs) and losses == sorted(losses, reverse=True)  # monotone
    assert all(p[kind] <= limit for p in result["evaluated"])
    assert len(result["evaluated"]) == result["space"]["evaluated"] > len(frontier)
    uniform = result["rules_at_budget"]["uniform"]
    assert uniform is None or (len(set(uniform["width"])) == 1 and uniform[kind] <= limit)
    written = json.loads((tmp_path / "out" / "frontier.json").read_text())
    assert written["chosen"]["width"] == result["chosen"]["width"]
    assert (tmp_path / "out" / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert list((tmp_path / "out").glob("events.out.tfevents.*"))
    out = capsys.readouterr().out
    assert "python main.py export" in out
    width = parse_width(str(tmp_path / "out" / "frontier.json"), lm_config())
    assert list(lm_config().resolve(width)) == result["chosen"]["width"]
    # the model's own loss on the confirmation batches gives the reported number
    model = load_model(lm_checkpoint)
    batches = list(TokenData().val_dataloader())[2:5]
    own = sum(float(model.loss(b, result["chosen"]["width"])) for b in batches) / 3
    assert own == pytest.approx(result["chosen"]["confirm"], rel=1e-5)


class ImageData(L.LightningDataModule):
    """Random images with class indices (B,), as `ImageDataModule` gives for val and test."""

    def __init__(self, batches: int = 6) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(batches * 8, 3, 32, 32, generator=g)
        self.targets = torch.randint(0, 10, (batches * 8,), generator=g)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(list(zip(self.images, self.targets)), batch_size=8)

    test_dataloader = val_dataloader


def test_search_a_vision_model_by_accuracy(tmp_path):
    from lit_matmamba.deploy.search import search

    torch.manual_seed(0)
    vision = MatMambaVision(MatMambaConfig.from_name("vision-tiny"))
    path = vision.save_pretrained(tmp_path / "v")
    budget = vision.num_params([64, 32])
    result = search(
        str(path),
        f"params={budget}",
        output=str(tmp_path / "s"),
        data=ImageData(),
        metric="top1",
        proxy_batches=2,
    )
    frontier = result["frontier"]
    assert result["chosen"]["params"] <= budget and result["higher_is_better"]
    assert [p["confirm"] for p in frontier] == sorted(p["confirm"] for p in frontier)  # accuracy rises
    assert all(0 <= p["confirm"] <= 1 for p in frontier)
    pyramid = result["rules_at_budget"]["pyramid"]
    assert pyramid["width"] == [64, 32] and result["rules_at_budget"]["inverted_pyramid"]["width"] == [32, 64]
    model = MatMambaVision.from_pretrained(path)
    images, targets = ImageData().images[16:48], ImageData().targets[16:48]  # the confirmation batches
    accuracy = float((model(images, pyramid["width"]).argmax(-1) == targets).float().mean())
    assert accuracy == pytest.approx(pyramid["confirm"])


# lm-evaluation-harness ---------------------------------------------------------------------------
TASKS = {
    "tiny_ll": (
        "loglikelihood",
        'doc_to_text: "{{context}}"\ndoc_to_target: "{{continuation}}"\nmetric_list:\n  - metric: acc\n',
    ),
    "tiny_rolling": (
        "loglikelihood_rolling",
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n',
    ),
    "tiny_gen": (
        "generate_until",
        'doc_to_text: "{{context}}"\ndoc_to_target: "{{continuation}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 6\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n",
    ),
}


def write_tasks(root: Path) -> Path:
    docs = [
        {"context": "When shall we three", "continuation": " meet again", "text": TEXT[:90]},
        {"context": "Upon the", "continuation": " heath.", "text": TEXT[50:200]},
        {"context": "in thunder, lightning, or", "continuation": " in rain?", "text": TEXT * 2},
    ]
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    for name, (output_type, rest) in TASKS.items():
        (root / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\noutput_type: {output_type}\n{rest}"
        )
    return root


def own_logprob(
    model: MatMambaLM, context: list[int], continuation: list[int], width, max_length: int
) -> float:
    """The model's own loss (its cross-entropy op) summed over the continuation, given at most the
    last `max_length` tokens before each (the adapter's documented truncation)."""
    seq = (context + continuation)[-(max_length + 1) :]
    losses = model.loss(torch.tensor([seq]), width, reduction="none")  # one per predicted token
    return -float(losses[len(seq) - len(continuation) - 1 :].sum())


def test_lm_eval_adapter_matches_the_model(lm_checkpoint, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    import lit_matmamba.deploy.harness  # noqa: F401  (registers "matmamba")

    width = [32, 4, 16]
    results = lm_eval.simple_evaluate(
        model="matmamba",
        model_args=f"pretrained={lm_checkpoint},width=32:4:16,max_length=16",
        batch_size=2,
        tasks=list(TASKS),
        task_manager=TaskManager(include_path=str(write_tasks(tmp_path))),
        log_samples=True,
        random_seed=0,
    )
    pretrained = load(lm_checkpoint)
    model, tok = pretrained.model, pretrained.tokenizer()
    assert all(len(results["samples"][task]) == 3 for task in TASKS)
    for sample_ in results["samples"]["tiny_ll"]:
        doc = sample_["doc"]
        context, continuation = (
            tok.encode(doc["context"]).ids,
            tok.encode(doc["context"] + doc["continuation"]).ids,
        )
        continuation = continuation[len(context) :]
        logprob, greedy = sample_["resps"][0][0]
        assert float(logprob) == pytest.approx(own_logprob(model, context, continuation, width, 16), abs=1e-4)
    for sample_ in results["samples"]["tiny_rolling"]:
        ids = tok.encode(sample_["doc"]["text"]).ids
        # windows of max_length=16 predictions, each conditioned on the tokens before it in the window
        expected, done = 0.0, 0
        while done < len(ids):
            n = min(16, len(ids) - done)
            context = [0] if done == 0 else ids[done + n - 17 : done]
            expected += own_logprob(model, context, ids[done : done + n], width, 16)
            done += n
        assert float(sample_["resps"][0][0]) == pytest.approx(expected, abs=1e-3)
    for sample_ in results["samples"]["tiny_gen"]:
        ids = tok.encode(sample_["doc"]["context"]).ids[-16:]
        greedy = argmax_by_forward(model, ids, 6, width)[len(ids) :]
        if 0 in greedy:
            greedy = greedy[: greedy.index(0)]
        assert sample_["resps"][0][0] == tok.decode(greedy, skip_special_tokens=True).split("\n")[0]


# The demo, as a user runs it --------------------------------------------------------------------
@pytest.mark.slow
def test_every_command_on_the_demo_checkpoint(tmp_path, capsys, monkeypatch):
    """A few steps of `fit --config configs/lm_demo.yaml`, then export, generate, search and lm_eval
    from its checkpoint."""
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    repo = Path(__file__).resolve().parents[1]
    main(
        [
            "fit",
            "--config",
            str(repo / "configs/lm_demo.yaml"),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.logger",
            "false",
            "--trainer.max_steps",
            "3",
            "--model.init_args.scheduler.init_args.warmup_steps",
            "1",
            "--trainer.limit_val_batches",
            "0",
            "--trainer.callbacks",
            "lightning.pytorch.callbacks.ModelCheckpoint",
            "--trainer.callbacks.dirpath",
            str(tmp_path / "ckpt"),
            "--trainer.callbacks.save_last",
            "true",
            "--trainer.enable_progress_bar",
            "false",
            "--data.init_args.num_workers",
            "0",
        ]
    )
    ckpt = str(tmp_path / "ckpt" / "last.ckpt")
    capsys.readouterr()
    out = run_command(
        ["export", "--ckpt_path", ckpt, "--width", "D/2", "--output", str(tmp_path / "d2")], capsys
    )
    assert "MambaLMHeadModel.from_pretrained" in out
    run_command(
        ["export", "--ckpt_path", ckpt, "--width", "[128,64,32,16]", "--output", str(tmp_path / "mix")],
        capsys,
    )
    ids = torch.randint(0, 4096, (1, 20))
    nested = load_model(ckpt)
    torch.testing.assert_close(
        MatMambaLM.from_pretrained(tmp_path / "mix")(ids), nested(ids, [128, 64, 32, 16])
    )
    out = run_command(
        ["generate", "--model", str(tmp_path / "d2"), "--prompt", "ROMEO:", "--max_new_tokens", "5"], capsys
    )
    assert out.startswith("ROMEO:") and "tokens/s" in out
    budget = nested.num_params([64, 64, 32, 32])
    out = run_command(
        [
            "search",
            "--ckpt_path",
            ckpt,
            "--budget",
            f"params={budget}",
            "--output",
            str(tmp_path / "search"),
            "--population",
            "4",
            "--generations",
            "1",
            "--proxy_batches",
            "1",
            "--confirm_batches",
            "1",
        ],
        capsys,
    )
    chosen = json.loads((tmp_path / "search" / "frontier.json").read_text())["chosen"]
    assert chosen["params"] <= budget and "python main.py export" in out
    (tmp_path / "tasks").mkdir()
    write_tasks(tmp_path / "tasks")
    main(
        [
            "lm_eval",
            "--model",
            "matmamba",
            "--model_args",
            f"pretrained={tmp_path / 'd2'}",
            "--batch_size",
            "4",
            "--tasks",
            "tiny_ll",
            "--include_path",
            str(tmp_path / "tasks"),
            "--limit",
            "2",
        ]
    )
    assert "tiny_ll" in capsys.readouterr().out
