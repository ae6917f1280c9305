"""The command line as a user runs it: every shipped config, the demo fits, validate, prepare."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_matmamba.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_there_are_configs_for_every_preset():
    names = {p.stem for p in CONFIGS}
    assert {
        "lm_demo",
        "lm_130m",
        "lm_370m",
        "lm_790m",
        "lm_1_4b",
        "vision_demo",
        "vision_35m",
        "vision_135m",
    } <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_parses(config, capsys):
    """--print_config parses and type-checks the whole config (class paths included) and exits."""
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(config), "--print_config"])
    assert done.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "lit_matmamba.training." in printed and "class_path" in printed


STRATEGIES = sorted((REPO / "configs" / "strategy").glob("*.yaml"))


def test_there_are_strategy_configs():
    assert {p.stem for p in STRATEGIES} == {"ddp", "fsdp", "tp", "fsdp_tp"}


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda p: p.stem)
@pytest.mark.parametrize("config", ["lm_demo", "lm_1_4b", "vision_135m"])
def test_every_strategy_config_composes_with_a_model_config(config, strategy, capsys):
    with pytest.raises(SystemExit) as done:
        main(
            [
                "fit",
                "--config",
                str(REPO / f"configs/{config}.yaml"),
                "--config",
                str(strategy),
                "--print_config",
            ]
        )
    assert done.value.code in (0, None)
    printed = capsys.readouterr().out
    expected = "DDPStrategy" if strategy.stem == "ddp" else "ModelParallelStrategy"
    assert f"lightning.pytorch.strategies.{expected}" in printed
    assert "lit_matmamba.training." in printed  # the model config is still all there


def test_a_mesh_bigger_than_the_world_is_a_clear_error_before_any_process_starts():
    args = [
        "fit",
        "--config",
        str(REPO / "configs/lm_demo.yaml"),
        "--config",
        str(REPO / "configs/strategy/fsdp_tp.yaml"),
    ]
    with pytest.raises(SystemExit, match="^error: .*tensor_parallel_size=4 does not fit the 2 processes"):
        main([*args, "--trainer.devices=2", "--trainer.strategy.init_args.tensor_parallel_size=4"])


def test_unknown_config_key_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as done:
        main(
            ["fit", "--config", str(REPO / "configs/lm_demo.yaml"), "--model.init_args.granularitys", "[64]"]
        )
    assert done.value.code != 0
    assert "granularitys" in capsys.readouterr().err


def test_help_explains_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "prepare text" in out and "fit" in out
    for command in ("prepare", "bench", "plot"):  # listed beside the Trainer's commands
        assert f"    {command}  " in out, command
    for command in ("bench", "plot"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "--help" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    assert "images" in capsys.readouterr().out


@pytest.mark.parametrize("flag", [True, False])
def test_allow_data_mismatch_reaches_the_module(flag):
    import lightning as L

    from lit_matmamba.cli import MatMambaArgumentParser, MatMambaCLI
    from lit_matmamba.training import NestedModule

    args = ["--config", str(REPO / "configs/lm_demo.yaml"), "--allow_data_mismatch", str(flag).lower()]
    cli = MatMambaCLI(
        NestedModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_class=MatMambaArgumentParser,
        run=False,
        args=args,
    )
    assert cli.model.allow_data_mismatch is flag


def test_model_help_lists_the_models_not_every_torch_module(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "lit_matmamba.training.LanguageModeling"])
    out = capsys.readouterr().out
    assert "lit_matmamba.MatMambaLM" in out and "lit_matmamba.MatMambaVision" in out
    assert "torch.nn.Linear" not in out and len(out.splitlines()) < 200


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gives")
def test_bench_without_a_gpu_says_so_in_one_line():
    with pytest.raises(SystemExit, match="runs on a CUDA GPU"):
        main(["bench", "speed", "--preset", "lm-tiny"])


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_lm_demo_fit_logs_every_granularity_and_validate_reproduces(tmp_path, capsys):
    logs = tmp_path / "logs"
    common = [
        "--config",
        str(REPO / "configs/lm_demo.yaml"),
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.logger.init_args.save_dir",
        str(logs),
        "--trainer.limit_val_batches",
        "2",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.log_every_n_steps",
        "1",
    ]
    main(
        [
            "fit",
            *common,
            "--trainer.max_steps",
            "4",
            "--trainer.val_check_interval",
            "2",
            "--model.init_args.scheduler.init_args.warmup_steps",
            "1",
            "--data.init_args.num_workers",
            "0",
        ]
    )
    run = logs / "lm_demo" / "version_0"
    tags = scalars(run)
    for width in (128, 64, 32, 16):  # one tag per granularity and metric, read back with TensorBoard
        for metric in ("train/loss", "val/loss", "val/ppl", "val/bpb"):
            assert f"{metric}/w{width}" in tags, f"{metric}/w{width}"
    assert {"perf/tokens_per_sec", "train/grad_norm", "train/lr"} <= set(tags)
    acc = EventAccumulator(str(run))
    acc.Reload()
    assert "mixnmatch/curve" in acc.Tags()["images"] and (run / "mixnmatch.png").is_file()
    png = tmp_path / "curves.png"
    main(["plot", str(run), "--metrics", "[train/loss, val/ppl]", "--out", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no tags val/top1/w<width>"):
        main(["plot", str(run), "--metrics", "[val/top1]", "--out", str(png)])
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()

    capsys.readouterr()
    main(["validate", *common, "--ckpt_path", str(ckpt), "--trainer.logger", "false"])
    printed = capsys.readouterr().out
    last_val = tags["val/loss/w16"][-1][1]
    assert f"{last_val:.5f}"[:6] in printed  # the checkpoint gives the logged validation loss again

    out = tmp_path / "preds.pt"
    main(
        [
            "predict",
            *common,
            "--ckpt_path",
            str(ckpt),
            "--trainer.logger",
            "false",
            "--trainer.limit_predict_batches",
            "0.06",
            "--trainer.callbacks+=lit_matmamba.training.PredictionWriter",
            "--trainer.callbacks.path",
            str(out),
        ]
    )
    preds = torch.load(out)
    assert set(preds) == {"loss/w128", "loss/w64", "loss/w32", "loss/w16"}
    assert preds["loss/w16"].ndim == 1 and 0 < len(preds["loss/w16"]) <= 32  # 6% of the test split: 2 batches
    assert torch.isfinite(preds["loss/w16"]).all()


@pytest.mark.slow
def test_vision_demo_fit_logs_top1_per_granularity(tmp_path):
    logs = tmp_path / "logs"
    main(
        [
            "fit",
            "--config",
            str(REPO / "configs/vision_demo.yaml"),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.logger.init_args.save_dir",
            str(logs),
            "--trainer.max_steps",
            "3",
            "--trainer.val_check_interval",
            "3",
            "--trainer.limit_val_batches",
            "2",
            "--model.init_args.scheduler.init_args.warmup_steps",
            "1",
            "--data.init_args.num_workers",
            "0",
            "--data.init_args.batch_size",
            "16",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.log_every_n_steps",
            "1",
        ]
    )
    tags = scalars(logs / "vision_demo" / "version_0")
    for width in (128, 64, 32, 16):
        for metric in ("val/top1", "val/top5", "val/loss", "train/loss"):
            assert f"{metric}/w{width}" in tags, f"{metric}/w{width}"
        assert 0.0 <= tags[f"val/top1/w{width}"][-1][1] <= 1.0


def test_prepare_text_through_main(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train(
        [str(text)],
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok.save(str(tmp_path / "tokenizer.json"))
    main(
        [
            "prepare",
            "text",
            "--output_dir",
            str(tmp_path / "shards"),
            "--tokenizer",
            str(tmp_path / "tokenizer.json"),
            "--train",
            str(text),
            "--val_fraction",
            "0",
            "--seq_len",
            "64",
            "--progress",
            "false",
        ]
    )
    assert (tmp_path / "shards" / "index.json").is_file()
    assert list((tmp_path / "shards").glob("train-*.tar"))


def test_load_model_from_a_training_checkpoint(tmp_path):
    """`load_model` rebuilds the plain-PyTorch model from a Lightning checkpoint, no YAML needed."""
    import lightning as L
    from torch.utils.data import DataLoader

    from lit_matmamba import MatMambaLM
    from lit_matmamba.training import LanguageModeling, load_model

    model = MatMambaLM("lm-tiny")
    data = torch.randint(0, 4096, (8, 9))
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_val_batches=0,
    )
    trainer.fit(LanguageModeling(model), DataLoader(data, batch_size=4))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = load_model(str(tmp_path / "m.ckpt"))
    ids = data[:2]
    torch.testing.assert_close(loaded(ids, 8), model(ids, 8))


def test_custom_head_from_config_without_editing_the_package():
    import lightning as L

    from lit_matmamba.cli import MatMambaCLI
    from lit_matmamba.training import NestedModule

    head = [
        "--model.init_args.model.init_args.head",
        '{"class_path": "torch.nn.Linear", "init_args": {"in_features": 128, "out_features": 10}}',
    ]
    cli = MatMambaCLI(
        NestedModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=["--config", str(REPO / "configs/vision_demo.yaml"), *head],
        run=False,
    )
    assert type(cli.model.model.head) is torch.nn.Linear
    assert cli.model.model(torch.randn(2, 3, 28, 28), width=16).shape == (2, 10)
