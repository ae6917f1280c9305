"""The recipe study: nested training recipes against standalone models, per width and Mix'n'Match.

An *arm* is a config overlay, `configs/study/<task>_<arm>.yaml`, on its task's base config,
`configs/study/<task>.yaml`: `main.py fit --config BASE --config ARM` trains what the study
trains. `run` trains one arm once per seed (the seed sets the initialisation and the data order,
so that every arm sees the same batches for a seed), tests every evaluated width on the test split
and writes `<results>/<arm>/seed<k>.json`. `table` reads all of them and prints Markdown tables
(every width per arm; nested minus standalone; Mix'n'Match against the line between its trained
neighbours) and draws quality versus parameters per task.

  python main.py study run configs/study/lm_paper.yaml --seeds [0,1]
  python main.py study table --plot_dir docs

An arm whose model trains one granularity, its own full width (`granularities: [W]` on a model
configured with `layer_widths` W everywhere), is a *standalone* model of width W: the table
compares it with the nested arms' sub-model of width W, which has the same parameters.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

METRICS = {"loss": "lower", "top1": "higher"}  # what the table reports, and which way is better


def default_base(arm: str | Path) -> Path:
    """The base config of an arm: `<folder>/<task>.yaml` for `<folder>/<task>_<arm>.yaml`."""
    arm = Path(arm)
    return arm.with_name(arm.stem.split("_")[0] + ".yaml")


def run(
    arm: str,
    seeds: list[int] | None = None,
    base: str | None = None,
    results: str = "logs/study",
    args: list[str] | None = None,
) -> None:
    """Train one arm of the study once per seed, test every evaluated width, write the results.

    Args:
        arm: the arm's config overlay, e.g. configs/study/lm_sandwich_kd.yaml.
        seeds: one training run per seed (`seed_everything` and the data module's `seed`); default [0].
        base: the task's base config; default `<task>.yaml` beside `<task>_<arm>.yaml`.
        results: where `<arm>/seed<k>.json` (and the runs' TensorBoard logs) go.
        args: more LightningCLI arguments for every run, e.g. [--trainer.max_steps=100].
    """
    from lit_matmamba.cli import main

    base_path = Path(base) if base else default_base(arm)
    if not base_path.is_file():
        raise FileNotFoundError(f"{base_path}: no base config for {arm} (give --base)")
    name = Path(arm).stem
    for seed in seeds or [0]:
        cli = main(
            [
                "--config",
                str(base_path),
                "--config",
                str(arm),
                "--seed_everything",
                str(seed),
                "--data.init_args.seed",
                str(seed),
                "--trainer.logger.init_args.save_dir",
                results,
                "--trainer.logger.init_args.name",
                name,
                "--trainer.logger.init_args.version",
                f"seed{seed}",
                *(args or []),
            ],
            run=False,
        )
        trainer, module, data = cli.trainer, cli.model, cli.datamodule
        start = time.perf_counter()
        trainer.fit(module, datamodule=data)
        fit_seconds = time.perf_counter() - start
        tested = trainer.test(module, datamodule=data, verbose=False)[0]
        record = {
            "arm": name,
            "task": base_path.stem,
            "seed": seed,
            "configs": [str(base_path), str(arm), *(args or [])],
            "standalone": is_standalone(module),
            "recipe": recipe(module),
            "steps": trainer.global_step,
            "fit_seconds": round(fit_seconds, 1),
            "points": points(module, tested),
        }
        out = Path(results) / name / f"seed{seed}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1))
        print(f"wrote {out}")


def is_standalone(module: Any) -> bool:
    """Whether the module trains one width, the full width of its model at every layer."""
    grans = module.granularities
    return len(grans) == 1 and module.model.config.resolve(None) == [grans[0]] * module.model.config.n_layer


def recipe(module: Any) -> dict[str, Any]:
    import dataclasses

    sampling, distillation = module.width_policy.sampling, module.distillation
    return {
        "granularities": module.granularities,
        "loss_weights": module.width_policy.loss_weights,
        "width_sampling": dataclasses.asdict(sampling),
        "distillation": dataclasses.asdict(distillation) if distillation else None,
    }


def points(module: Any, tested: dict[str, float]) -> list[dict[str, Any]]:
    """One entry per evaluated width: label, width, parameters, inference FLOPs per token (at the
    model's chunk size) and the test metrics."""
    out = []
    model = module.model
    for label, width in module.evaluated():
        point = {
            "label": label,
            "width": width,
            "params": model.num_params(width),
            "flops_per_token": model.flops_per_token(width, training=False),
        }
        for metric in METRICS:
            key = f"test/{metric}/{label}"
            if key in tested:
                value = tested[key]
                point[metric] = float(value.item() if isinstance(value, torch.Tensor) else value)
        out.append(point)
    return out


# Tables -------------------------------------------------------------------------------------------
def load(results: str | Path) -> dict[str, dict[str, list[dict]]]:
    """task -> arm -> the runs' records (standalone runs of every width under the arm "standalone")."""
    tasks: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(Path(results).glob("*/seed*.json")):
        record = json.loads(path.read_text())
        task = record["task"]
        arm = "standalone" if record["standalone"] else record["arm"].removeprefix(f"{task}_")
        tasks[task][arm].append(record)
    if not tasks:
        raise FileNotFoundError(f"no results (<arm>/seed<k>.json) under {results}: run `study run` first")
    return tasks


def width_name(width: Any) -> str:
    """128, or 128-64-32-16 for a Mix'n'Match width."""
    return str(width) if isinstance(width, int) else "-".join(map(str, width))


def by_label(records: list[dict], metric: str) -> dict[str, list[tuple[int, float]]]:
    """label -> [(seed, value)] over runs."""
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in records:
        for p in r["points"]:
            if metric in p:
                out[p["label"]].append((r["seed"], p[metric]))
    return out


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and half the range (0 for one value)."""
    return sum(values) / len(values), (max(values) - min(values)) / 2


def fmt(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    m, s = mean_spread(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def line_value(point: dict, trained: list[dict], metric: str) -> float | None:
    """The metric on the straight line, in parameters, between the trained widths just below and
    just above `point` (None outside their range)."""
    below = [t for t in trained if t["params"] <= point["params"]]
    above = [t for t in trained if t["params"] >= point["params"]]
    if not below or not above:
        return None
    lo = max(below, key=lambda t: t["params"])
    hi = min(above, key=lambda t: t["params"])
    if hi["params"] == lo["params"]:
        return lo[metric]
    f = (point["params"] - lo["params"]) / (hi["params"] - lo["params"])
    return lo[metric] + f * (hi[metric] - lo[metric])


def task_tables(task: str, arms: dict[str, list[dict]], metric: str) -> str:
    digits = 4 if metric == "loss" else 2
    scale = 100.0 if metric == "top1" else 1.0  # accuracy in percent
    nested = [a for a in arms if a != "standalone"]
    reference = arms[nested[0]][0] if nested else arms["standalone"][0]
    # Rows: the evaluated widths of the nested arms (standalone runs fill their own width).
    rows = [(p["label"], p["width"], p["params"], p["flops_per_token"]) for p in reference["points"]]
    values = {a: by_label(runs, metric) for a, runs in arms.items()}
    seeds = {a: sorted({r["seed"] for r in runs}) for a, runs in arms.items()}
    what = {"loss": "test loss (nats)", "top1": "test top-1 (%)"}[metric]
    lines = [
        f"**{task}: {what}**, mean ± half the range over seeds "
        + ", ".join(f"{a}: {len(s)} seed(s)" for a, s in seeds.items()),
        "",
        "| width | params | MFLOPs/token | " + " | ".join(arms) + " |",
        "|---|---|---|" + "---|" * len(arms),
    ]
    for label, width, params, flops in rows:
        cells = []
        for a in arms:
            vals = [v * scale for _, v in values[a].get(label, [])]
            cells.append(fmt(vals, digits))
        lines.append(
            f"| {width_name(width)} | {params / 1e6:.3f}M | {flops / 1e6:.2f} | " + " | ".join(cells) + " |"
        )
    lines.append("")
    if "standalone" in arms and nested:
        standalone_params = {p["label"]: p["params"] for r in arms["standalone"] for p in r["points"]}
        lines += [
            f"**{task}: nested minus standalone**, {metric}, per width (paired by seed; mean ± half the range)",
            "",
            "| width | " + " | ".join(nested) + " |",
            "|---|" + "---|" * len(nested),
        ]
        for label, width, params, _ in rows:
            if label not in standalone_params:
                continue
            if standalone_params[label] != params:
                raise ValueError(
                    f"{task}: the standalone model of width {label} has {standalone_params[label]} "
                    f"parameters, the nested sub-model {params}"
                )
            alone = dict(values["standalone"][label])
            cells = []
            for a in nested:
                diffs = [(v - alone[s]) * scale for s, v in values[a].get(label, []) if s in alone]
                cells.append(fmt(diffs, digits))
            lines.append(f"| {width_name(width)} | " + " | ".join(cells) + " |")
        lines.append("")
    mixes = [row for row in rows if row[0].startswith("mix")]
    if mixes and nested:
        better = "below" if METRICS[metric] == "lower" else "above"
        lines += [
            f"**{task}: Mix'n'Match minus the line between its trained neighbours**, {metric} "
            f"(per seed, then mean ± half the range; the target is 0 or {better}: "
            f"{'negative' if better == 'below' else 'positive'})",
            "",
            "| width | params | " + " | ".join(nested) + " |",
            "|---|---|" + "---|" * len(nested),
        ]
        for label, width, params, _ in mixes:
            cells = []
            for a in nested:
                gaps = []
                for r in arms[a]:
                    pts = {p["label"]: p for p in r["points"]}
                    trained = [pts[f"w{g}"] for g in r["recipe"]["granularities"]]
                    on_line = line_value(pts[label], trained, metric)
                    if on_line is not None:
                        gaps.append((pts[label][metric] - on_line) * scale)
                cells.append(fmt(gaps, digits))
            lines.append(f"| {width_name(width)} | {params / 1e6:.3f}M | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(task: str, arms: dict[str, list[dict]], metric: str, path: Path) -> Path:
    """Quality versus parameters: every arm's trained widths joined by a line, its Mix'n'Match
    widths as markers of the same colour; means over seeds."""
    from lit_matmamba import plots

    series: dict[str, list[dict]] = {}
    colors: dict[str, str] = {}
    lines = []
    scale = 100.0 if metric == "top1" else 1.0
    for i, (arm, runs) in enumerate(arms.items()):
        vals = by_label(runs, metric)
        first = {p["label"]: p for p in runs[0]["points"]}
        trained, mixed = [], []
        for label, pairs in vals.items():
            p = first.get(label) or next(q for r in runs for q in r["points"] if q["label"] == label)
            point = {"params": p["params"], metric: scale * sum(v for _, v in pairs) / len(pairs)}
            (mixed if label.startswith("mix") else trained).append(point)
        series[arm] = trained
        lines.append(arm)
        colors[arm] = f"C{i}"
        if mixed:
            series[f"{arm}: Mix'n'Match"] = mixed
            colors[f"{arm}: Mix'n'Match"] = f"C{i}"
    what = {"loss": "test loss (nats)", "top1": "test top-1 (%)"}[metric]
    fig = plots.quality_vs_params(series, metric, title=f"{task}: {what}", lines=lines, colors=colors)
    fig.axes[0].set_ylabel(what)
    return plots.save(fig, path)


def table(results: str = "logs/study", plot_dir: str | None = None) -> None:
    """Print the study's Markdown tables from the results of `study run`, and draw quality versus
    parameters per task.

    Args:
        results: the folder `study run` wrote (`<arm>/seed<k>.json`).
        plot_dir: where to write `study_<task>.png` (the language tasks' loss, the vision tasks'
            top-1); None: no plots.
    """
    for task, arms in load(results).items():
        arms = dict(sorted(arms.items(), key=lambda kv: (kv[0] == "standalone", kv[0])))
        has_top1 = any("top1" in p for runs in arms.values() for r in runs for p in r["points"])
        for metric in ("loss", "top1") if has_top1 else ("loss",):
            print(task_tables(task, arms, metric))
        if plot_dir is not None:
            path = plot(task, arms, "top1" if has_top1 else "loss", Path(plot_dir) / f"study_{task}.png")
            print(f"wrote {path}\n")
        budget = {a: sum(r["fit_seconds"] for r in runs) / 60 for a, runs in arms.items()}
        print(
            f"{task}: training minutes per arm, all seeds: "
            + ", ".join(f"{a} {m:.1f}" for a, m in budget.items())
        )
        print()


def main(argv: list[str], prog: str = "python main.py study") -> None:
    from jsonargparse import CLI

    CLI([run, table], args=argv, prog=prog, description=__doc__)
