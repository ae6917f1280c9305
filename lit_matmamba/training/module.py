"""LightningModules that train every granularity of a nested model on the same batch.

The model (a plain-PyTorch `MatMambaLM`, `MatMambaVision` or other `NestedModel`, taking `width`) is
injected, so a YAML `class_path` swaps backbone, head, optimizer and scheduler.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lit_matmamba.graphs import GraphedTrainStep
from lit_matmamba.io import check_checkpoint_data, checkpoint_metadata
from lit_matmamba.models import NestedModel
from lit_matmamba.models.config import Width

from . import parallel
from .joint import Distillation, WidthPolicy, WidthSampling, capture_joint_step, joint_backward
from .optim import adamw, param_groups
from .parallel import clip_grad_norm, gradient_sync, is_distributed


class NestedModule(L.LightningModule):
    """Joint training of a model's granularities, one optimizer step per batch.

    For every batch the training step runs the joint step (`lit_matmamba.training.joint`): each
    width of the step on the same batch, `loss_weight * loss` back-propagated right away (so only
    one width's activations are alive at a time), then one optimizer step. The widths of a step are
    every granularity (the paper's recipe, the default) or what `width_sampling` draws; with
    `distillation`, the widest teaches the others. Under DDP/FSDP gradients are reduced on the last
    backward of an optimizer step only. Under Lightning's `ModelParallelStrategy`, `configure_model`
    shards the model with `lit_matmamba.training.parallel.parallelize` (FSDP2, tensor parallelism,
    or both on a 2-D mesh), and the ranks of a tensor-parallel group train on the batch of its first
    rank. Validation and test evaluate every granularity and each width in `eval_widths`, and log
    one tag per width and metric (`val/loss/w768`, `val/loss/mix0`, ...). The loss is the model's
    own (`model.loss`).

    Args:
        model: the nested model; its forward and `loss` take `width` (see `models/config.py`).
        granularities: the widths trained together (the one place they are set); None: the
            paper's D, D/2, D/4, D/8 (`model.config.default_granularities()`). Checkpoints record them.
        loss_weights: one weight per granularity, used whenever a step trains that width; None:
            equal weights that sum to 1 over a step's widths (the average).
        width_sampling: which widths each step trains (`lit_matmamba.training.joint.WidthSampling`:
            every granularity, or the sandwich rule, plus widths sampled per step); None: every
            granularity, nothing sampled (the paper's recipe).
        distillation: in-place self-distillation (`lit_matmamba.training.joint.Distillation`): the
            widest width's detached predictions also teach the others; None: off (the paper's).
        eval_widths: more widths evaluated in validation and test, logged as `mix0`, `mix1`, ...
            in this order: Mix'n'Match widths (one int per layer) or ints between the granularities.
        optimizer: builds the optimizer from parameter groups (no weight decay on 1-D parameters).
        scheduler: builds a per-step LR scheduler from the optimizer; None: constant LR.
        accumulate_grad_batches: micro-batches per optimizer step (use this, not the Trainer's
            flag: the step is optimised by hand).
        gradient_clip_val: max global gradient norm; None or 0 disables clipping (use this, not
            the Trainer's flag).
        check_finite: stop with a clear error on a NaN or inf loss (one host sync per step);
            false: warn once and train on (checked every `log_every_n_steps` steps).
        direct_weight_grads: add each width's weight gradients straight into the used block of
            `.grad` (`lit_matmamba.models.nested_linear`: memory traffic proportional to the width
            instead of full-size per width). None: on when training in one process; it cannot be
            used under DDP/FSDP, whose gradient reduction hooks it bypasses.
        cuda_graphs: capture the forward and backward of all granularities (and the clipping) as
            one CUDA graph at the first training batch and replay it for every batch of the same
            shape (`lit_matmamba.training.joint.capture_joint_step`): removes the kernel-launch overhead that
            makes small widths no faster. One GPU, `accumulate_grad_batches=1`, bf16-mixed or fp32
            precision (no fp16 loss scaling), the same widths every step (no `num_sampled`;
            distillation is fine). Batches of another shape (a short last batch) run the eager
            step; the graph keeps its own activation memory.
        ssd_configs: warps and stages of mamba-ssm's SSD kernels on the GPU, pinned once at setup
            (`lit_matmamba.kernels.pin_ssd_configs`): "auto" (the table tuned for this GPU model,
            if the package ships one; else mamba-ssm's autotuning), "off" (mamba-ssm's autotuning
            everywhere) or the path of a table written by `main.py bench tune`.
        activation_checkpointing: recompute each block's activations in the backward instead of
            keeping them (less memory, about one more forward of compute); any strategy.
        mixed_precision: "bf16": under ModelParallelStrategy with FSDP2, parameters are gathered
            and used in bf16 and gradients reduced in float32, while the sharded parameters and
            optimizer state stay float32 (set trainer.precision to 32-true). None: off.
    """

    # (stage, metric) pairs charted with every width on one chart (callbacks.GranularityCharts).
    chart_metrics: tuple[tuple[str, str], ...] = (("train", "loss"), ("val", "loss"))
    # A custom head of the model as {"class_path", "init_args"}, the way a YAML config gives it.
    # `MatMambaCLI` fills it in from the config; checkpoints record it so that `load_model`
    # rebuilds the head. Set it yourself for a head built in Python whose arguments `load_model`
    # cannot read off it (an `nn.Linear`'s it can).
    head_spec: dict[str, Any] | None = None
    # Load a checkpoint (resume, validate, test, predict) although the data's tokenizer or shards
    # differ from those it was trained on (`io.check_checkpoint_data`); `main.py --allow_data_mismatch`.
    allow_data_mismatch: bool = False

    def __init__(
        self,
        model: NestedModel,
        granularities: list[int] | None = None,
        loss_weights: list[float] | None = None,
        width_sampling: WidthSampling | None = None,
        distillation: Distillation | None = None,
        eval_widths: list[int | list[int]] | None = None,
        optimizer: OptimizerCallable = adamw,
        scheduler: LRSchedulerCallable | None = None,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = 1.0,
        check_finite: bool = True,
        direct_weight_grads: bool | None = None,
        cuda_graphs: bool = False,
        ssd_configs: str = "auto",
        activation_checkpointing: bool = False,
        mixed_precision: Literal["bf16"] | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.model = model
        # Parameters exempt from weight decay by their `_no_weight_decay` mark (optim.param_groups),
        # by name: parallelize() and moving sharded parameters give them new objects.
        self._no_decay_names = {
            n for n, p in model.named_parameters() if getattr(p, "_no_weight_decay", False)
        }
        config = model.config
        self.granularities = list(config.default_granularities() if granularities is None else granularities)
        for w in self.granularities:
            try:
                config.resolve(w)
            except ValueError as err:
                raise ValueError(f"granularities: {err}") from None
        # The widths and loss weights of each step (checks both); `distillation` teaches from the
        # first width of a step, so that must be the widest.
        self.width_policy = WidthPolicy(config, self.granularities, loss_weights, width_sampling)
        self.loss_weights = self.width_policy.loss_weights
        self.distillation = distillation
        if distillation is not None:
            if self.width_policy.anchors[0] != max(self.granularities):
                raise ValueError(
                    "distillation teaches from the first granularity, which must be the widest: "
                    f"list granularities widest first, got {self.granularities}"
                )
            if len(self.width_policy(0)[0]) < 2:
                raise ValueError("distillation needs at least two widths per step (a teacher and a student)")
        self.eval_widths = [w if isinstance(w, int) else list(w) for w in (eval_widths or [])]
        for i, w in enumerate(self.eval_widths):
            try:
                config.resolve(w)
            except ValueError as err:
                raise ValueError(f"eval_widths[{i}]: {err}") from None
        if accumulate_grad_batches < 1:
            raise ValueError("accumulate_grad_batches must be >= 1")
        if cuda_graphs and accumulate_grad_batches != 1:
            raise ValueError("cuda_graphs needs accumulate_grad_batches=1 (one graph is one optimizer step)")
        if cuda_graphs and not self.width_policy.fixed:
            raise ValueError(
                "cuda_graphs needs the same widths every step (a graph is captured for fixed widths): "
                "width_sampling.num_sampled must be 0"
            )
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.accumulate_grad_batches = accumulate_grad_batches
        self.gradient_clip_val = gradient_clip_val
        self.check_finite = check_finite
        self.direct_weight_grads = direct_weight_grads
        self.cuda_graphs = cuda_graphs
        self.ssd_configs = ssd_configs
        self.activation_checkpointing = activation_checkpointing
        self.mixed_precision = mixed_precision
        self._parallelized = False
        self._graph: GraphedTrainStep | None = None
        self._eager_warned = False
        self.step_widths: list[Width] = []  # the widths the latest training step trained
        self._non_finite_seen: torch.Tensor | None = None  # check_finite=False: a NaN/inf loss was seen
        self._non_finite_warned = False
        self.metrics = nn.ModuleDict(
            {
                stage: nn.ModuleDict({label: self.make_metrics() for label, _ in self.evaluated()})
                for stage in ("val", "test")
            }
        )

    # What subclasses define --------------------------------------------------------------
    def loss(
        self, batch: Any, width: Width, return_logits: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The model's own loss of `batch` at `width`, a 0-d tensor; with `return_logits`, (loss,
        the logits it was computed from), for distillation."""
        raise NotImplementedError

    def make_metrics(self) -> nn.ModuleDict:
        raise NotImplementedError

    def update_metrics(self, metrics: nn.ModuleDict, batch: Any, width: Width) -> None:
        raise NotImplementedError

    def batch_size(self, batch: Any) -> int:
        raise NotImplementedError

    def batch_tokens(self, batch: Any) -> int:
        """Tokens the model processes for this batch (throughput and MFU)."""
        raise NotImplementedError

    # Widths ------------------------------------------------------------------------------
    def evaluated(self) -> list[tuple[str, Width]]:
        """(label, width) of every width evaluated: the granularities (`w768`, ...), then
        `eval_widths` (`mix0`, `mix1`, ...). The labels name the metrics' tags."""
        return [(f"w{w}", w) for w in self.granularities] + [
            (f"mix{i}", w) for i, w in enumerate(self.eval_widths)
        ]

    def forward(self, *args: Any, width: Width | None = None, **kwargs: Any) -> torch.Tensor:
        return self.model(*args, width=width, **kwargs)

    # Training ----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:
            self.check_data(datamodule)
        if stage == "fit":  # clear errors before any step runs
            if self.cuda_graphs:
                self._check_graphs_possible()
            if self.direct_weight_grads and self._sharded_or_multiprocess():
                self._use_direct_weight_grads(self.trainer.strategy.model, distributed=True)
        device = self.trainer.strategy.root_device
        if device.type == "cuda":
            from lit_matmamba.kernels import pin_ssd_configs

            pin_ssd_configs(self.ssd_configs, device.index)

    def _sharded_or_multiprocess(self) -> bool:
        return self.trainer.world_size > 1 or self.device_mesh is not None

    def configure_model(self) -> None:
        """Under ModelParallelStrategy, shard the model over its device mesh (and with
        `activation_checkpointing`, under any strategy): `parallel.parallelize`, once."""
        if self._parallelized or (
            self.device_mesh is None and not self.activation_checkpointing and self.mixed_precision is None
        ):
            return
        parallel.parallelize(
            self.model,
            self.device_mesh,
            widths=[width for _, width in self.evaluated()],
            activation_checkpointing=self.activation_checkpointing,
            mixed_precision=self.mixed_precision,
        )
        self._parallelized = True

    def synchronize_batch(self, batch: Any) -> Any:
        """The batch to train or evaluate on: under tensor parallelism, the first rank's of the
        tensor-parallel group on every rank of it (the ranks of a group compute one model on one
        batch, whatever their data loaders gave them); otherwise `batch` itself. Every step calls
        this, and so does anything else that runs the model on loader batches (callbacks)."""
        if self.device_mesh is not None:
            tp_mesh = parallel.mesh_dims(self.device_mesh)[1]
            if tp_mesh is not None and tp_mesh.size() > 1:
                return parallel.broadcast_batch(batch, tp_mesh)
        return batch

    def check_data(self, datamodule: L.LightningDataModule) -> None:
        """Raise a clear error when the data does not fit the model (vocabulary, classes)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        batch = self.synchronize_batch(batch)
        if self.cuda_graphs:
            step = self._graph_for(batch)
            if step is not None:
                return self._graphed_training_step(step, batch)
        steps_now = (batch_idx + 1) % self.accumulate_grad_batches == 0 or self._last_batch(batch_idx)
        wrapped = self.trainer.strategy.model  # the DDP/FSDP wrapper, if any
        # A function of (seed, optimizer step): the same on every rank and for every micro-batch.
        widths, weights = self.width_policy(self.global_step)
        self.step_widths = widths
        losses = joint_backward(
            self._joint_loss(),
            batch,
            widths,
            [w / self.accumulate_grad_batches for w in weights],
            backward=self.manual_backward,
            gradient_sync=lambda enabled: gradient_sync(wrapped, enabled),
            sync_last=steps_now,
            direct_weight_grads=self._use_direct_weight_grads(wrapped),
            distillation=self.distillation,
        )
        total = self._log_losses(losses, widths, weights, batch)
        if steps_now:
            norm = clip_grad_norm(wrapped, self.parameters(), self.gradient_clip_val)
            self._optimizer_step(norm)
            self.optimizers().zero_grad(set_to_none=True)
        return total

    def _joint_loss(self) -> Any:
        """The loss function of the joint step: with distillation it returns the logits too."""
        return self.loss if self.distillation is None else functools.partial(self.loss, return_logits=True)

    def _log_losses(
        self, losses: torch.Tensor, widths: list[Width], weights: list[float], batch: Any
    ) -> torch.Tensor:
        """Logs the step's per-width task losses (len(widths),), a granularity's as
        `train/loss/w<width>` and the mean of the others as `train/loss/sampled`, and returns their
        weighted sum."""
        total = (losses * losses.new_tensor(weights)).sum()
        sampled = []
        for width, loss in zip(widths, losses):
            if isinstance(width, int) and width in self.granularities:
                self.log(f"train/loss/w{width}", loss, batch_size=self.batch_size(batch))
            else:
                sampled.append(loss)
        if sampled:
            self.log("train/loss/sampled", torch.stack(sampled).mean(), batch_size=self.batch_size(batch))
        if self.check_finite and not torch.isfinite(total):
            raise FloatingPointError(
                f"non-finite training loss ({total.item()}) at step {self.global_step}: "
                f"per-width losses are logged under train/loss/w*. Lower the learning rate, "
                f"check the data, or use bf16 rather than fp16."
            )
        if not self.check_finite:
            self._warn_non_finite_once(total)
        self.log("train/loss", total, prog_bar=True, batch_size=self.batch_size(batch))
        return total

    def _warn_non_finite_once(self, total: torch.Tensor) -> None:
        """check_finite=False: warn once when a training loss was NaN or inf. The flag stays on the
        device and is looked at every `log_every_n_steps` steps (no host sync of its own otherwise)."""
        if self._non_finite_warned:
            return
        bad = ~torch.isfinite(total.detach())
        self._non_finite_seen = bad if self._non_finite_seen is None else self._non_finite_seen | bad
        if (self.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0 and bool(
            self._non_finite_seen
        ):
            rank_zero_warn(
                f"check_finite is false and a training loss was NaN or inf by step {self.global_step}: "
                f"training goes on (a ModelCheckpoint of lit_matmamba.training writes no checkpoint of "
                f"non-finite weights). check_finite: true stops at the first one."
            )
            self._non_finite_warned = True

    def _optimizer_step(self, grad_norm: torch.Tensor) -> None:
        opt = self.optimizers()
        self.log("train/grad_norm", grad_norm)
        self.log("train/lr", opt.param_groups[0]["lr"])
        opt.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    def _graph_for(self, batch: Any) -> GraphedTrainStep | None:
        """The captured step for this batch's shapes (captured at the first batch), or None."""
        if self._graph is None:  # setup() checked that graphs are possible
            dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
            widths, weights = self.width_policy(0)  # fixed: the same at every step
            self._graph = capture_joint_step(
                self._joint_loss(),
                batch,
                widths,
                weights,
                self.model.parameters(),
                max_grad_norm=self.gradient_clip_val,
                autocast_dtype=dtype,
                direct_weight_grads=self._use_direct_weight_grads(self.trainer.strategy.model),
                distillation=self.distillation,
            )
        if self._graph.matches(batch):
            return self._graph
        if not self._eager_warned:
            rank_zero_warn(
                "cuda_graphs: a batch of another shape than the captured one runs the eager step "
                "(drop_last in the data loader avoids a short last batch)"
            )
            self._eager_warned = True
        for p in self.parameters():  # the eager step accumulates into fresh gradients
            p.grad = None
        return None

    def _check_graphs_possible(self) -> None:
        problems = []
        device = self.trainer.strategy.root_device
        if device.type != "cuda":
            problems.append(f"the model is on {device.type}, not a CUDA GPU")
        if self._sharded_or_multiprocess() or is_distributed(self.trainer.strategy.model):
            problems.append(
                "training is distributed or sharded (DDP, FSDP or tensor parallelism): CUDA graphs "
                "capture one process's step; use them on one GPU (trainer.strategy auto, devices 1)"
            )
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            problems.append("fp16 loss scaling is on (use precision bf16-mixed)")
        if problems:
            raise ValueError("cuda_graphs=True cannot be used: " + "; ".join(problems))

    def _graphed_training_step(self, step: GraphedTrainStep, batch: Any) -> torch.Tensor:
        losses, norm = step(batch)  # static buffers, overwritten by the next replay
        widths, weights = self.width_policy(self.global_step)
        self.step_widths = widths
        total = self._log_losses(losses.clone(), widths, weights, batch)
        # The optimizer runs outside the graph on the gradients the replay left in .grad (no
        # zero_grad: the next replay writes them afresh).
        self._optimizer_step(norm.clone())
        return total

    def _use_direct_weight_grads(self, wrapped: nn.Module, distributed: bool | None = None) -> bool:
        distributed = is_distributed(wrapped) if distributed is None else distributed
        if self.direct_weight_grads and distributed:
            raise ValueError(
                "direct_weight_grads=True cannot be used with DDP, FSDP or tensor parallelism (it "
                "bypasses their gradient reduction and sharded parameters); leave it None (auto) or "
                "set it to false"
            )
        return not distributed if self.direct_weight_grads is None else self.direct_weight_grads

    def _last_batch(self, batch_idx: int) -> bool:
        n = self.trainer.num_training_batches
        return isinstance(n, int) and batch_idx + 1 == n

    def configure_optimizers(self) -> Any:
        for name, p in self.model.named_parameters():  # marks that sharding and moving drop
            if name in self._no_decay_names:
                p._no_weight_decay = True
        optimizer = self.optimizer_factory(param_groups(self.model))
        parallel.register_optimizer(optimizer, self.model)  # tensor parallelism: canonical state
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        if getattr(scheduler, "max_steps", 0) is None:  # WarmupCosine: the schedule spans the whole fit
            scheduler.set_max_steps(self.total_optimizer_steps())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def total_optimizer_steps(self) -> int:
        """Optimizer steps of the whole fit (the Trainer's estimate counts batches; this module
        accumulates micro-batches itself)."""
        if self.trainer.max_steps and self.trainer.max_steps > 0:
            return self.trainer.max_steps
        return max(1, int(self.trainer.estimated_stepping_batches) // self.accumulate_grad_batches)

    # Evaluation --------------------------------------------------------------------------
    def _eval_step(self, stage: str, batch: Any) -> None:
        for label, width in self.evaluated():
            self.update_metrics(self.metrics[stage][label], batch, width)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step("val", self.synchronize_batch(batch))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step("test", self.synchronize_batch(batch))

    def _log_epoch(self, stage: str) -> None:
        for label, _ in self.evaluated():
            for name, value in self.compute_metrics(stage, self.metrics[stage][label]).items():
                # The full and the smallest width's loss show in the progress bar.
                shown = name == "loss" and label in (
                    f"w{self.granularities[0]}",
                    f"w{self.granularities[-1]}",
                )
                self.log(f"{stage}/{name}/{label}", value, prog_bar=shown)
            for metric in self.metrics[stage][label].values():
                metric.reset()

    def compute_metrics(self, stage: str, metrics: nn.ModuleDict) -> dict[str, torch.Tensor]:
        return {name: metric.compute() for name, metric in metrics.items()}

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    # Checkpoints carry what rebuilds and deploys the plain model without the YAML: its class,
    # config and granularities, a custom head's class path and arguments, the data module's
    # tokenizer and sequence length (the format: lit_matmamba/io.py).
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if hasattr(self.model, "config"):
            checkpoint["matmamba"] = checkpoint_metadata(
                self.model,
                self.granularities,
                head=self.head_spec,
                datamodule=getattr(self.trainer, "datamodule", None),
                cls=parallel.model_class(self.model),  # the model's own class, not FSDP2's wrapper
            )
        # By name, not position, so that a one-process checkpoint resumes sharded and back.
        parallel.key_optimizer_states_by_name(
            checkpoint,
            self,
            self.trainer.optimizers,
            by_module_order=self.device_mesh is not None,
        )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint_data(
            checkpoint.get("matmamba"),
            getattr(self.trainer, "datamodule", None) if self._trainer is not None else None,
            where=str(getattr(self.trainer, "ckpt_path", None) or "the checkpoint"),
            allow=self.allow_data_mismatch,
        )


class LanguageModeling(NestedModule):
    """Next-token prediction. Batches are token ids (B, L); metrics per width: loss (nats per
    token), perplexity, and bits per byte when the data module knows its bytes per token."""

    chart_metrics = (("train", "loss"), ("val", "loss"), ("val", "ppl"), ("val", "bpb"))

    def loss(
        self, batch: torch.Tensor, width: Width, return_logits: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The model's mean next-token cross-entropy (`MatMambaLM.loss`) of token ids (B, L)."""
        return self.model.loss(batch, width, return_logits=return_logits)

    def make_metrics(self) -> nn.ModuleDict:
        return nn.ModuleDict({"loss": torchmetrics.MeanMetric()})

    @torch.no_grad()
    def update_metrics(self, metrics: nn.ModuleDict, batch: torch.Tensor, width: Width) -> None:
        metrics["loss"].update(self.loss(batch, width), weight=batch[:, 1:].numel())

    def compute_metrics(self, stage: str, metrics: nn.ModuleDict) -> dict[str, torch.Tensor]:
        loss = metrics["loss"].compute()
        out = {"loss": loss, "ppl": torch.exp(loss)}
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "bytes_per_token"):
            out["bpb"] = loss / math.log(2) / datamodule.bytes_per_token(stage)
        return out

    @torch.no_grad()
    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> dict[str, torch.Tensor]:
        """Per sequence and evaluated width: the mean next-token loss, `{"loss/w768": (B,), ...}`
        (per-token losses by the same `cross_entropy` op as training: no float32 copy of the logits)."""
        batch = self.synchronize_batch(batch)
        out = {}
        for label, width in self.evaluated():
            losses = self.model.loss(batch, width, reduction="none")  # (B * (L-1),)
            out[f"loss/{label}"] = losses.view(batch.shape[0], -1).mean(1)
        return out

    def batch_size(self, batch: torch.Tensor) -> int:
        return batch.shape[0]

    def batch_tokens(self, batch: torch.Tensor) -> int:
        return batch[:, :-1].numel()

    def check_data(self, datamodule: L.LightningDataModule) -> None:
        if hasattr(datamodule, "check_vocab"):
            datamodule.check_vocab(self.model.config.vocab_size)


class ImageClassification(NestedModule):
    """Classification. Batches are (images (B, C, H, W), targets): class indices, or soft targets
    (B, num_classes) from mixup/cutmix in training. Metrics per width: loss, top-1, top-5."""

    chart_metrics = (("train", "loss"), ("val", "loss"), ("val", "top1"), ("val", "top5"))

    def loss(
        self, batch: tuple[torch.Tensor, torch.Tensor], width: Width, return_logits: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The model's cross-entropy (`MatMambaVision.loss`): class indices or soft targets."""
        images, targets = batch
        return self.model.loss(images, targets, width, return_logits=return_logits)

    def make_metrics(self) -> nn.ModuleDict:
        n = self.model.config.num_classes
        return nn.ModuleDict(
            {
                "loss": torchmetrics.MeanMetric(),
                "top1": torchmetrics.classification.MulticlassAccuracy(n, top_k=1, average="micro"),
                "top5": torchmetrics.classification.MulticlassAccuracy(n, top_k=min(5, n), average="micro"),
            }
        )

    @torch.no_grad()
    def update_metrics(self, metrics: nn.ModuleDict, batch: Any, width: Width) -> None:
        images, targets = batch
        logits = self.model(images, width=width).float()
        metrics["loss"].update(F.cross_entropy(logits, targets), weight=targets.shape[0])
        metrics["top1"].update(logits, targets)
        metrics["top5"].update(logits, targets)

    @torch.no_grad()
    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        """Per image and evaluated width: the predicted class, `{"class/w512": (B,), ...}`, and the
        target as `"target"` when the batch has one."""
        images, targets = self.synchronize_batch(batch)
        out = {
            f"class/{label}": self.model(images, width=width).argmax(-1) for label, width in self.evaluated()
        }
        if not targets.is_floating_point():
            out["target"] = targets
        return out

    def batch_size(self, batch: Any) -> int:
        return batch[0].shape[0]

    def batch_tokens(self, batch: Any) -> int:
        images = batch[0]
        p = self.model.config.patch_size
        return images.shape[0] * ((images.shape[-2] // p) * (images.shape[-1] // p) + 1)

    def check_data(self, datamodule: L.LightningDataModule) -> None:
        if hasattr(datamodule, "check_num_classes"):
            datamodule.check_num_classes(self.model.config.num_classes)


class TokenClassification(NestedModule):
    """One label per token (tagging) from a custom head on a language model's features.

    Batches are `(input_ids, labels)`, both (B, L); a label of -100 (`ignore_index`, as in
    `F.cross_entropy`) marks a token without one. The model is a `MatMambaLM` whose head maps the
    per-token features (B, L, d_model) to one logit per class, (B, L, num_classes), given in the
    config (`model.init_args.head`). The model is causal: a token's label can only be predicted
    from that token and those before it. Loss: the mean cross-entropy over labelled tokens.
    Metrics per width: that loss and the accuracy, both over every labelled token of the split.
    """

    chart_metrics = (("train", "loss"), ("val", "loss"), ("val", "acc"))
    ignore_index = -100

    def logits(self, input_ids: torch.Tensor, labels: torch.Tensor, width: Width) -> torch.Tensor:
        """The head's outputs (B, L, num_classes) in float32, after checking they fit the labels."""
        logits = self.model(input_ids, width)
        if logits.shape[:2] != labels.shape:
            raise ValueError(
                f"the model gives outputs of shape {tuple(logits.shape)} for labels of shape "
                f"{tuple(labels.shape)}: a token classifier's head maps (B, L, d_model) to (B, L, classes)"
            )
        return logits.float()

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor], width: Width) -> torch.Tensor:
        """Mean cross-entropy over the labelled tokens (0 for a batch without any)."""
        input_ids, labels = batch
        logits = self.logits(input_ids, labels, width)
        total = F.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), ignore_index=self.ignore_index, reduction="sum"
        )
        # Divided by the count rather than reduction="mean", which gives NaN for a batch without labels.
        return total / (labels != self.ignore_index).sum().clamp(min=1)

    def make_metrics(self) -> nn.ModuleDict:
        return nn.ModuleDict({"loss": torchmetrics.MeanMetric(), "acc": torchmetrics.MeanMetric()})

    @torch.no_grad()
    def update_metrics(
        self, metrics: nn.ModuleDict, batch: tuple[torch.Tensor, torch.Tensor], width: Width
    ) -> None:
        input_ids, labels = batch
        labelled = labels != self.ignore_index  # (B, L)
        count = int(labelled.sum())
        if count == 0:
            return
        logits = self.logits(input_ids, labels, width)[labelled]  # (N, C)
        labels = labels[labelled]  # (N,)
        # Weighted by the batch's labelled tokens: the split's metric is a mean over tokens.
        metrics["loss"].update(F.cross_entropy(logits, labels), weight=count)
        metrics["acc"].update((logits.argmax(-1) == labels).float().mean(), weight=count)

    @torch.no_grad()
    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        """Per token and evaluated width: the predicted class, `{"class/w512": (B, L), ...}`, and
        the labels as `"target"`."""
        input_ids, labels = self.synchronize_batch(batch)
        out = {
            f"class/{label}": self.logits(input_ids, labels, width).argmax(-1)
            for label, width in self.evaluated()
        }
        out["target"] = labels
        return out

    def batch_size(self, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        return batch[0].shape[0]

    def batch_tokens(self, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        return batch[0].numel()

    def check_data(self, datamodule: L.LightningDataModule) -> None:
        if hasattr(datamodule, "check_vocab"):
            datamodule.check_vocab(self.model.config.vocab_size)
