"""Draw per-granularity curves from a run's TensorBoard events (what the README shows).

python scripts/plot_curves.py logs/lm_demo/version_0 --metrics train/loss val/loss --out docs/lm_demo_curves.png
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a TensorBoard run directory (holding events.out.tfevents.*)")
    ap.add_argument(
        "--metrics", nargs="+", default=["train/loss", "val/loss"], help="tag prefixes, one panel each"
    )
    ap.add_argument("--out", required=True, help="PNG to write")
    args = ap.parse_args()
    acc = EventAccumulator(args.run, size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    fig, axes = plt.subplots(1, len(args.metrics), figsize=(5.5 * len(args.metrics), 3.8), dpi=110)
    axes = [axes] if len(args.metrics) == 1 else list(axes)
    for ax, metric in zip(axes, args.metrics):
        series = sorted(
            (t for t in tags if re.fullmatch(rf"{re.escape(metric)}/w\d+", t)),
            key=lambda t: -int(t.rsplit("w", 1)[1]),
        )
        if not series:
            raise SystemExit(f"no tags {metric}/w* in {args.run}; tags there: {sorted(tags)[:20]}")
        for tag in series:
            events = acc.Scalars(tag)
            ax.plot(
                [e.step for e in events],
                [e.value for e in events],
                marker="o" if len(events) < 20 else None,
                label=f"width {tag.rsplit('w', 1)[1]}",
            )
        ax.set_title(metric)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
