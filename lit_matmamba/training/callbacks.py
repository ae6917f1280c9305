"""Callbacks: per-granularity charts, throughput and MFU, the Mix'n'Match accuracy/compute curve, and
checkpoints that keep their promises."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch import callbacks
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from lightning_utilities.core.apply_func import apply_to_collection

from .module import NestedModule


def _tensorboard(trainer: L.Trainer) -> TensorBoardLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


class GranularityCharts(L.Callback):
    """Puts every width of a metric on one TensorBoard chart.

    The module logs one scalar tag per width and metric (`val/loss/w768`, `val/loss/w96`, ...);
    this adds a "Custom Scalars" layout with one multi-line chart per metric
    (TensorBoard's CUSTOM SCALARS tab), so the granularities are compared at a glance.
    """

    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module: NestedModule) -> None:
        tb = _tensorboard(trainer)
        if tb is None:
            return
        charts: dict[str, dict[str, list]] = {}
        for stage, metric in pl_module.chart_metrics:
            charts.setdefault(f"granularities ({stage})", {})[f"{stage}/{metric}"] = [
                "Multiline",
                [rf"^{stage}/{metric}/(w|mix)\d+$"],
            ]
        tb.experiment.add_custom_scalars(charts)


class ThroughputMonitor(L.Callback):
    """Logs tokens/s and samples/s of the joint step, and MFU when the accelerator's peak is known.

    MFU = (training FLOPs per token of the widths each step trained, from the model's counts) x
    tokens/s / peak FLOP/s. The peak is `peak_tflops`, or looked up for known GPUs (dense bf16).

    Args:
        log_every_n_steps: average over this many optimizer steps.
        peak_tflops: the accelerator's peak dense TFLOP/s (per device) for MFU.
    """

    KNOWN_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}

    def __init__(self, log_every_n_steps: int = 10, peak_tflops: float | None = None) -> None:
        self.log_every_n_steps = log_every_n_steps
        self.peak_tflops = peak_tflops
        self._flops_cache: dict[tuple, float] = {}
        self._reset()

    def _reset(self) -> None:
        self._start: float | None = None
        self._tokens = 0
        self._samples = 0
        self._batches = 0
        self._flops = 0.0  # model FLOPs of the window's training steps

    def _step_flops_per_token(self, pl_module: NestedModule, seq_len: int | None) -> float:
        """Training FLOPs per token of the widths the latest step trained (they may change every
        step: `width_sampling`); a uniform width's are memoised, a sampled Mix'n'Match width's are not
        (it seldom comes back)."""
        total = 0.0
        for w in pl_module.step_widths:
            key = (w, seq_len) if not isinstance(w, list) else None
            flops = self._flops_cache.get(key) if key else None
            if flops is None:
                flops = pl_module.model.flops_per_token(w, training=True, seq_len=seq_len)
                if key:
                    self._flops_cache[key] = flops
            total += flops
        return total

    def _peak(self, pl_module: L.LightningModule) -> float | None:
        if self.peak_tflops:
            return self.peak_tflops * 1e12
        if pl_module.device.type == "cuda":
            name = torch.cuda.get_device_name(pl_module.device)
            for key, tflops in self.KNOWN_PEAK_TFLOPS.items():
                if key in name:
                    return tflops * 1e12
        return None

    def _sync(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: NestedModule, batch: Any, batch_idx: int
    ) -> None:
        if self._start is None:
            self._sync(pl_module)
            self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: NestedModule, outputs: STEP_OUTPUT, batch: Any, batch_idx: int
    ) -> None:
        tokens = pl_module.batch_tokens(batch)
        self._tokens += tokens
        self._samples += pl_module.batch_size(batch)
        self._batches += 1
        seq_len = batch.shape[1] - 1 if isinstance(batch, torch.Tensor) else None
        self._flops += tokens * self._step_flops_per_token(pl_module, seq_len)
        if self._batches >= self.log_every_n_steps * pl_module.accumulate_grad_batches:
            self._flush(trainer, pl_module)

    def _flush(self, trainer: L.Trainer, pl_module: NestedModule) -> None:
        """Log the window measured so far and start a new one."""
        if self._batches == 0:
            return
        self._sync(pl_module)
        elapsed = time.perf_counter() - self._start
        world = trainer.world_size
        # The ranks of a tensor-parallel group share one batch: count each data-parallel replica's.
        replicas = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
        tokens_per_sec = self._tokens * replicas.get("num_replicas", world) / elapsed
        metrics = {
            "perf/tokens_per_sec": tokens_per_sec,
            "perf/samples_per_sec": self._samples * replicas.get("num_replicas", world) / elapsed,
        }
        peak = self._peak(pl_module)
        if peak is not None:
            metrics["perf/mfu"] = self._flops / elapsed / peak
        pl_module.log_dict(metrics)
        self._reset()

    def on_validation_start(self, trainer: L.Trainer, pl_module: NestedModule) -> None:
        # Validation time is not training throughput: close the window here.
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._flush(trainer, pl_module)
        self._reset()


class MixNMatchCurve(L.Callback):
    """At the end of validation, evaluates many sub-models and draws metric versus parameters.

    The points are the granularities plus `widths` (Mix'n'Match widths, one int per layer); with
    `widths` None, Mix'n'Match widths are generated between each pair of adjacent granularities:
    the first j layers at the larger width and the rest at the smaller one, for `steps` values of
    j. Each point is evaluated on up to `max_batches` validation batches. The figure goes to
    TensorBoard (IMAGES tab, tag `mixnmatch/curve`) and to `<log_dir>/mixnmatch.png`.

    Args:
        widths: Mix'n'Match widths to evaluate besides the granularities.
        steps: generated widths per pair of granularities (when `widths` is None).
        max_batches: validation batches per setting.
        metric: "loss" (default) or another metric name the module computes (e.g. "top1").
        every_n_epochs: draw at every n-th validation.
    """

    def __init__(
        self,
        widths: list[list[int]] | None = None,
        steps: int = 3,
        max_batches: int = 4,
        metric: str = "loss",
        every_n_epochs: int = 1,
    ) -> None:
        self.widths = widths
        self.steps = steps
        self.max_batches = max_batches
        self.metric = metric
        self.every_n_epochs = every_n_epochs
        self.last_points: list[dict[str, Any]] = []

    def _points(self, pl_module: NestedModule) -> list[tuple[str, list[int] | int]]:
        grans = sorted(pl_module.granularities, reverse=True)
        out: list[tuple[str, list[int] | int]] = [(f"w{w}", w) for w in grans]
        if self.widths is not None:
            return out + [(f"mix{i}", list(w)) for i, w in enumerate(self.widths)]
        n = pl_module.model.config.n_layer
        for big, small in zip(grans, grans[1:]):
            for j in sorted({round(n * (i + 1) / (self.steps + 1)) for i in range(self.steps)} - {0, n}):
                out.append((f"{big}x{j}+{small}x{n - j}", [big] * j + [small] * (n - j)))
        return out

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: NestedModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        loader = trainer.val_dataloaders
        if isinstance(loader, list | tuple):
            loader = loader[0]
        batches = []
        for i, batch in enumerate(loader):
            if i >= self.max_batches:
                break
            batches.append(batch)
        # Every rank evaluates as many batches: under tensor parallelism each is exchanged.
        count = int(
            trainer.strategy.reduce(torch.tensor(len(batches), device=pl_module.device), reduce_op="min")
        )
        batches = [
            pl_module.synchronize_batch(
                apply_to_collection(b, torch.Tensor, lambda t: t.to(pl_module.device))
            )
            for b in batches[:count]
        ]
        if not batches:
            return
        points = []
        for label, width in self._points(pl_module):
            metrics = pl_module.make_metrics().to(pl_module.device)
            for batch in batches:
                pl_module.update_metrics(metrics, batch, width)
            value = pl_module.compute_metrics("val", metrics)[self.metric]
            value = float(trainer.strategy.reduce(value, reduce_op="mean"))
            points.append(
                {
                    "label": label,
                    "width": width,
                    "params": pl_module.model.num_params(width),
                    self.metric: value,
                }
            )
        self.last_points = points
        self._draw(trainer, points)

    @rank_zero_only
    def _draw(self, trainer: L.Trainer, points: list[dict[str, Any]]) -> None:
        from lit_matmamba import plots

        uniform = [p for p in points if isinstance(p["width"], int)]
        mixed = [p for p in points if not isinstance(p["width"], int)]
        fig = plots.quality_vs_params(
            {"granularities": uniform, "Mix'n'Match": mixed},
            self.metric,
            title=f"Mix'n'Match sub-models, step {trainer.global_step}",
            lines=["granularities"],
        )
        fig.axes[0].set_ylabel(f"validation {self.metric}")
        tb = _tensorboard(trainer)
        if tb is None:
            plots.plt.close(fig)
            return
        tb.experiment.add_figure("mixnmatch/curve", fig, global_step=trainer.global_step, close=False)
        # tb.log_dir, not trainer.log_dir: this runs on rank 0 only, and under DDP trainer.log_dir
        # is a collective (a broadcast) that the other ranks would never join.
        plots.save(fig, Path(tb.log_dir) / "mixnmatch.png")


class PredictionWriter(BasePredictionWriter):
    """Writes what `main.py predict` computes to `path` (a `torch.save` of a dict of tensors, one
    entry per key of `predict_step`'s output, rows in data order), written atomically; with several
    ranks each writes `path` with `.rankN` appended.

    Args:
        path: output file, e.g. `predictions.pt`.
    """

    def __init__(self, path: str = "predictions.pt") -> None:
        super().__init__(write_interval="epoch")
        self.path = Path(path)

    def write_on_epoch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        if predictions and isinstance(predictions[0], list):  # several dataloaders: the first
            predictions = predictions[0]
        merged = {
            key: torch.cat([p[key].cpu() for p in predictions])
            for key in (predictions[0] if predictions else {})
        }
        path = (
            self.path
            if trainer.world_size == 1
            else self.path.with_name(f"{self.path.name}.rank{trainer.global_rank}")
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(merged, tmp)
        tmp.replace(path)
        print(f"wrote {len(next(iter(merged.values()), []))} predictions ({', '.join(merged)}) to {path}")


class ModelCheckpoint(callbacks.ModelCheckpoint):
    """Lightning's `ModelCheckpoint` (same arguments), with two promises:

    - with `save_last`, `last.ckpt` is written at the step the fit ends on, also when it stops at
      `max_steps` between validations (Lightning's keeps the last validation's);
    - no checkpoint is written while the weights hold a NaN or inf (possible with the module's
      `check_finite: false`): a warning says so once, and a finite `last.ckpt` is never
      overwritten by a diverged model.
    """

    _non_finite_warned = False

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        # Every checkpoint this callback writes (top-k, last, on exception) goes through here.
        if not weights_finite(trainer):
            if not self._non_finite_warned:
                rank_zero_warn(
                    f"the weights hold NaN or inf at step {trainer.global_step}: no checkpoint is "
                    f"written while they do (the last finite one, if any, is kept). The training loss "
                    f"diverged; the module's check_finite: true stops at the first non-finite loss."
                )
                self._non_finite_warned = True
            return
        super()._save_checkpoint(trainer, filepath)


def weights_finite(trainer: L.Trainer) -> bool:
    """Whether every parameter of the trained module is finite on every rank (one host sync)."""
    params = [p.detach() for p in trainer.lightning_module.parameters()]
    finite = bool(torch.stack([torch.isfinite(p).all() for p in params]).all()) if params else True
    return bool(trainer.strategy.reduce_boolean_decision(finite, all=True))
