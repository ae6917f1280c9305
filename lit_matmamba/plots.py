"""Figures: per-granularity curves from a run's TensorBoard events, quality versus size, heat-maps.

`python main.py plot RUN_DIR --metrics train/loss val/loss --out curves.png` draws the first; the
Mix'n'Match callback, the notebooks and the sub-model search draw the second; the retrieval
evaluation draws the third (query width x database width).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

# No display: figures go to files and TensorBoard. A backend already chosen is kept: Jupyter
# kernels set MPLBACKEND to their inline backend, which shows the Figures returned here.
if "MPLBACKEND" not in os.environ and "matplotlib.pyplot" not in sys.modules:
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def read_scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a TensorBoard run directory: tag -> [(step, value), ...]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not Path(run_dir).is_dir():
        raise FileNotFoundError(
            f"{run_dir} is not a directory (give a TensorBoard run, e.g. logs/lm_demo/version_0)"
        )
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def granularity_curves(run_dir: str | Path, metrics: Sequence[str] = ("train/loss", "val/loss")) -> Figure:
    """One panel per metric, one line per granularity (tags `<metric>/w<width>`), widest first."""
    scalars = read_scalars(run_dir)
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 3.8), dpi=110, squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        series = sorted(
            (t for t in scalars if re.fullmatch(rf"{re.escape(metric)}/w\d+", t)),
            key=lambda t: -int(t.rsplit("w", 1)[1]),
        )
        if not series:
            plt.close(fig)
            raise ValueError(f"no tags {metric}/w<width> in {run_dir}; its scalars: {sorted(scalars)[:20]}")
        for tag in series:
            steps, values = zip(*scalars[tag])
            ax.plot(
                steps, values, marker="o" if len(steps) < 20 else None, label=f"width {tag.rsplit('w', 1)[1]}"
            )
        ax.set_title(metric)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def quality_vs_params(
    series: dict[str, list[dict[str, Any]]],
    metric: str,
    title: str = "",
    lines: Sequence[str] = (),
    x: str = "params",
    colors: dict[str, str] | None = None,
) -> Figure:
    """Metric against parameters used (millions), or against another cost of the points (`x`,
    e.g. "flops" or "latency_ms"): `series` maps a legend label to points
    `{x: number, metric: float, "label": str (optional)}`; series named in `lines` are joined by
    lines (and their points labelled), the others drawn as markers; `colors` maps a series to a
    matplotlib colour (default: the colour cycle)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    markers = iter("xs^vD+*")
    scale = 1e-6 if x == "params" else 1.0
    colors = colors or {}
    for name, points in series.items():
        if not points:
            continue
        points = sorted(points, key=lambda p: p[x])
        xs, ys = [p[x] * scale for p in points], [p[metric] for p in points]
        style = {"color": colors[name]} if name in colors else {}
        if name in lines:
            ax.plot(xs, ys, "o-", label=name, **style)
            for p, px, py in zip(points, xs, ys):
                if p.get("label"):
                    ax.annotate(p["label"], (px, py), textcoords="offset points", xytext=(4, 4), fontsize=8)
        else:
            ax.plot(xs, ys, next(markers, "."), label=name, **style)
    ax.set_xlabel("parameters used (M)" if x == "params" else x)
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def heatmap(
    values: Sequence[Sequence[float]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    fmt: str = "{:.3f}",
) -> Figure:
    """A matrix as coloured cells, each with its value written in it: `values[i][j]` is the cell
    of row `row_labels[i]` (top to bottom) and column `col_labels[j]`."""
    import numpy as np

    data = np.asarray(values, dtype=float)
    if data.shape != (len(row_labels), len(col_labels)):
        raise ValueError(
            f"values of shape {data.shape} for {len(row_labels)} rows and {len(col_labels)} columns"
        )
    fig, ax = plt.subplots(figsize=(1.1 * len(col_labels) + 2.2, 0.8 * len(row_labels) + 1.6), dpi=100)
    image = ax.imshow(data, cmap="viridis")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(len(col_labels)), labels=list(col_labels))
    ax.set_yticks(range(len(row_labels)), labels=list(row_labels))
    middle = (np.nanmin(data) + np.nanmax(data)) / 2 if data.size else 0.0
    for (i, j), v in np.ndenumerate(data):
        # Dark text on the light (high) end of viridis, light text on the dark end.
        ax.text(j, i, fmt.format(v), ha="center", va="center", color="black" if v > middle else "white")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def save(fig: Figure, path: str | Path) -> Path:
    """Write `fig` as an image (the format from the suffix) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def curves(run_dir: str, metrics: list[str] | None = None, out: str = "curves.png") -> None:
    """Draw per-granularity curves of a training run from its TensorBoard events.

    Args:
        run_dir: a TensorBoard run directory, e.g. logs/lm_demo/version_0.
        metrics: tag prefixes, one panel each (default: train/loss val/loss); the run logs one tag
            per width, `<metric>/w<width>`.
        out: the image to write (PNG, SVG or PDF by its suffix).
    """
    print(f"wrote {save(granularity_curves(run_dir, metrics or ['train/loss', 'val/loss']), out)}")


def main(argv: list[str], prog: str = "python main.py plot") -> None:
    from jsonargparse import CLI

    CLI(curves, args=argv, prog=prog)
