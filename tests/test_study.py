"""The recipe study: its configs, the runner and the tables."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from lit_matmamba.cli import main
from lit_matmamba.training import study

REPO = Path(__file__).resolve().parents[1]
ARMS = sorted(p for p in (REPO / "configs/study").glob("*_*.yaml"))
TASKS = sorted(p.stem for p in (REPO / "configs/study").glob("*.yaml") if "_" not in p.stem)


def build(arm: Path):
    """The module an arm trains, built on the CPU (a GPU arm's trainer too)."""
    base = study.default_base(arm)
    cpu = ["--trainer.accelerator=cpu", "--trainer.precision=32-true"]
    return main(["--config", str(base), "--config", str(arm), *cpu], run=False).model


@functools.cache
def papers_module(task: str):
    return build(REPO / f"configs/study/{task}_paper.yaml")


def test_every_task_has_the_papers_arm_standalone_models_and_more():
    assert {"lm", "vision", "lm130m"} <= set(TASKS)
    for task in TASKS:
        names = {p.stem for p in ARMS if study.default_base(p).stem == task}
        assert {f"{task}_paper", f"{task}_sandwich_kd", f"{task}_all_kd", f"{task}_all_mix"} <= names
        assert len([n for n in names if n.startswith(f"{task}_standalone_w")]) == 4


@pytest.mark.parametrize("arm", ARMS, ids=lambda p: p.stem)
def test_every_arm_builds_and_standalone_models_match_the_nested_sub_models(arm):
    """Each arm parses on its base and builds its module; a standalone model has the parameters
    and FLOPs of the nested sub-model of its width, one of the paper's granularities."""
    module = build(arm)
    if "standalone" not in arm.stem:
        assert not study.is_standalone(module) and len(module.evaluated()) == 8
        return
    assert study.is_standalone(module)
    (width,) = module.granularities
    nested = papers_module(study.default_base(arm).stem)
    assert width in nested.granularities
    assert module.model.num_params() == nested.model.num_params(width)
    assert module.model.flops_per_token() == nested.model.flops_per_token(width)


def test_line_between_trained_neighbours():
    trained = [{"params": 10, "loss": 3.0}, {"params": 20, "loss": 2.0}, {"params": 40, "loss": 1.0}]
    assert study.line_value({"params": 15}, trained, "loss") == pytest.approx(2.5)
    assert study.line_value({"params": 35}, trained, "loss") == pytest.approx(1.25)
    assert study.line_value({"params": 20}, trained, "loss") == 2.0
    assert study.line_value({"params": 50}, trained, "loss") is None


def record(task, arm, seed, points, granularities, standalone=False):
    return {
        "arm": f"{task}_{arm}",
        "task": task,
        "seed": seed,
        "standalone": standalone,
        "recipe": {"granularities": granularities},
        "fit_seconds": 60.0,
        "points": points,
    }


def point(label, width, params, loss):
    return {"label": label, "width": width, "params": params, "flops_per_token": 2.0 * params, "loss": loss}


def test_table_reports_each_arm_the_gap_to_standalone_and_to_the_line(tmp_path, capsys):
    """Synthetic results: nested minus standalone and Mix'n'Match minus the line come out as
    computed by hand, per seed and then averaged."""
    for seed, shift in ((0, 0.0), (1, 0.02)):
        nested = [
            point("w8", 8, 100, 3.0 + shift),
            point("w4", 4, 60, 3.4 + shift),
            point("mix0", 6, 80, 3.1 + shift),  # the line is at 3.2: 0.1 below it
        ]
        runs = {
            "paper": record("t", "paper", seed, nested, [8, 4]),
            "standalone_w8": record("t", "standalone_w8", seed, [point("w8", 8, 100, 2.95)], [8], True),
            "standalone_w4": record("t", "standalone_w4", seed, [point("w4", 4, 60, 3.3)], [4], True),
        }
        for name, r in runs.items():
            (tmp_path / f"t_{name}").mkdir(exist_ok=True)
            (tmp_path / f"t_{name}" / f"seed{seed}.json").write_text(json.dumps(r))
    study.table(str(tmp_path), plot_dir=str(tmp_path / "plots"))
    out = capsys.readouterr().out
    assert "| 8 | 0.000M | 0.00 | 3.0100 ± 0.0100 | 2.9500 ± 0.0000 |" in out
    assert "| 8 | 0.0600 ± 0.0100 |" in out  # nested minus standalone at width 8
    assert "| 4 | 0.1100 ± 0.0100 |" in out
    assert "| 6 | 0.000M | -0.1000 ± 0.0000 |" in out  # Mix'n'Match 0.1 below the line
    assert (tmp_path / "plots" / "study_t.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_study_run_writes_every_width_of_an_arm(tmp_path):
    results = tmp_path / "results"
    study.run(
        str(REPO / "configs/study/lm_sandwich_kd.yaml"),
        seeds=[3],
        results=str(results),
        args=[
            "--trainer.max_steps=2",
            "--trainer.limit_test_batches=1",
            "--trainer.enable_progress_bar=false",
            "--model.init_args.scheduler.init_args.warmup_steps=1",
            "--data.init_args.num_workers=0",
        ],
    )
    r = json.loads((results / "lm_sandwich_kd" / "seed3.json").read_text())
    assert r["seed"] == 3 and r["steps"] == 2 and r["task"] == "lm" and not r["standalone"]
    assert (
        r["recipe"]["width_sampling"]["rule"] == "sandwich" and r["recipe"]["distillation"]["weight"] == 0.5
    )
    assert [p["label"] for p in r["points"]] == ["w128", "w64", "w32", "w16", "mix0", "mix1", "mix2", "mix3"]
    assert all(p["loss"] > 0 and p["params"] > 0 for p in r["points"])


def test_study_help_comes_from_the_docstrings(capsys):
    for argv in (["study", "--help"], ["study", "run", "--help"], ["study", "table", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
    out = capsys.readouterr().out
    assert "An *arm* is a config overlay" in out
    assert "one training run per seed" in out and "where to write `study_<task>.png`" in out
