"""The joint training step of a nested model, written once, in plain PyTorch, and its recipe.

Every width of the step runs forward and backward on the same batch, one after the other, and the
gradients of all of them add up in `.grad` before one optimizer step. Each width's loss is
back-propagated right away, so only one width's activations are alive at a time: the joint step's
peak memory is the widest width's, not the sum over widths.

The recipe: which widths a step trains and with which loss weights (`WidthSampling`, bound to a
model's granularities by `WidthPolicy`), and whether the narrower widths also learn from the
widest one's predictions (`Distillation`). The defaults are the paper's: every granularity, equal
weights, no distillation.

The training module (eager and CUDA-graphed), the benchmarks and the tests call `joint_backward`;
clipping (`parallel.clip_grad_norm`) and the optimizer step come after it, outside.
`capture_joint_step` captures it, with the clipping, as one CUDA graph: possible when a step's
widths are the same every step (`WidthPolicy.fixed`), with or without distillation.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from lit_matmamba.graphs import GraphedTrainStep, graph_autocast
from lit_matmamba.models.config import MatMambaConfig, Width
from lit_matmamba.models.nested_linear import direct_weight_grads as direct_grads

# (batch, width) -> the 0-d loss of the sub-model of that width on the batch; with distillation,
# (the 0-d loss, the logits it was computed from), e.g. `model.loss(..., return_logits=True)`.
LossFn = Callable[[Any, Width], torch.Tensor | tuple[torch.Tensor, torch.Tensor]]


# Which widths a step trains ----------------------------------------------------------------------
@dataclass(frozen=True)
class WidthSampling:
    """Which widths each training step trains, given the module's granularities.

    A step trains its *anchors*, then `num_sampled` widths drawn at random. The default (every
    granularity, nothing sampled) is the paper's recipe. Steps that sample cannot be CUDA graphs
    (their widths change from step to step); anchors alone can.

    Args:
        rule: the anchors. "all": every granularity; "sandwich": only the largest and the smallest
            granularity (the sandwich rule of slimmable networks and BigNAS: the ends bound every
            width between them, and the sampled widths fill the middle).
        num_sampled: widths drawn at random every step, after the anchors.
        per_layer: a sampled width is one width per layer, each layer drawn on its own (a random
            Mix'n'Match width); false: one width for every layer, drawn among the candidates that
            are not anchors, without repeats within a step.
        sample_from: the candidates. "range": every valid width from the smallest to the largest
            granularity (multiples of `config.width_step`); "granularities": the granularities.
        sampled_weight: the loss weight of a sampled width that is not a granularity (one that is
            takes the granularity's loss weight). None: 1/n, n the number of widths a step trains.
        seed: seeds the draws together with the optimizer step, so that every data-parallel rank
            trains the same widths in a step and a resumed run draws what the uninterrupted one
            would; None: the Lightning seed (`seed_everything`, the env `PL_GLOBAL_SEED`), else 0.

    Example (YAML, `model.init_args`):
        width_sampling: {rule: sandwich, num_sampled: 2, per_layer: true}
    """

    rule: Literal["all", "sandwich"] = "all"
    num_sampled: int = 0
    per_layer: bool = False
    sample_from: Literal["range", "granularities"] = "range"
    sampled_weight: float | None = None
    seed: int | None = None


class WidthPolicy:
    """A `WidthSampling` bound to a model's granularities: `policy(step)` gives the widths the
    optimizer step `step` trains and their loss weights, anchors first (the largest granularity
    first under the sandwich rule; in the granularities' order under "all").

    Args:
        config: the model's config (valid widths).
        granularities: the module's granularities (checked by `config.resolve`).
        loss_weights: one loss weight per granularity, used whenever the step trains that width;
            None: 1/n for every width, n the number of widths a step trains (the average).
        sampling: the rule; default the paper's (every granularity, nothing sampled).
    """

    def __init__(
        self,
        config: MatMambaConfig,
        granularities: Sequence[int],
        loss_weights: Sequence[float] | None = None,
        sampling: WidthSampling | None = None,
    ) -> None:
        self.config = config
        self.granularities = list(granularities)
        self.sampling = sampling = sampling or WidthSampling()
        if not self.granularities:
            raise ValueError("granularities is empty: give at least one width to train")
        if sampling.rule not in ("all", "sandwich"):
            raise ValueError(f'width_sampling.rule must be "all" or "sandwich", got {sampling.rule!r}')
        if sampling.sample_from not in ("range", "granularities"):
            raise ValueError(
                f'width_sampling.sample_from must be "range" or "granularities", got {sampling.sample_from!r}'
            )
        if sampling.num_sampled < 0:
            raise ValueError(f"width_sampling.num_sampled must be >= 0, got {sampling.num_sampled}")
        largest, smallest = max(self.granularities), min(self.granularities)
        if sampling.rule == "all":
            self.anchors: list[int] = list(self.granularities)
        else:
            self.anchors = [largest] if largest == smallest else [largest, smallest]
        if sampling.sample_from == "range":
            step = config.width_step
            self.candidates = [w for w in range(step, largest + 1, step) if w >= smallest]
        else:
            self.candidates = sorted(set(self.granularities), reverse=True)
        if not sampling.per_layer:  # a uniform sample is a width the step does not train already
            self.candidates = [w for w in self.candidates if w not in self.anchors]
            if sampling.num_sampled > len(self.candidates):
                raise ValueError(
                    f"width_sampling: cannot draw {sampling.num_sampled} different uniform widths from "
                    f"{self.candidates} (the candidates that are not trained every step already); "
                    f'draw fewer, use per_layer: true, sample_from: "range" or rule: "sandwich"'
                )
        n = len(self.anchors) + sampling.num_sampled
        if loss_weights is None:
            self.loss_weights = [1.0 / n] * len(self.granularities)
        elif len(loss_weights) != len(self.granularities):
            raise ValueError(
                f"loss_weights has {len(loss_weights)} entries for {len(self.granularities)} granularities"
            )
        else:
            self.loss_weights = [float(x) for x in loss_weights]
        self.sampled_weight = 1.0 / n if sampling.sampled_weight is None else float(sampling.sampled_weight)

    @property
    def fixed(self) -> bool:
        """Whether every step trains the same widths (then the step can be a CUDA graph)."""
        return self.sampling.num_sampled == 0

    def weight(self, width: Width) -> float:
        """The loss weight of `width`: its granularity's, or `sampled_weight` for any other width."""
        if isinstance(width, int) and width in self.granularities:
            return self.loss_weights[self.granularities.index(width)]
        return self.sampled_weight

    def seed(self) -> int:
        if self.sampling.seed is not None:
            return self.sampling.seed
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def __call__(self, step: int) -> tuple[list[Width], list[float]]:
        """(widths, loss weights) of optimizer step `step`: a function of the seed and `step` only."""
        widths: list[Width] = list(self.anchors)
        k = self.sampling.num_sampled
        if k:
            rng = np.random.default_rng([self.seed(), step])
            if self.sampling.per_layer:
                n = self.config.n_layer
                widths += [[int(w) for w in rng.choice(self.candidates, size=n)] for _ in range(k)]
            else:
                widths += [int(w) for w in rng.choice(self.candidates, size=k, replace=False)]
        return widths, [self.weight(w) for w in widths]


# Self-distillation ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Distillation:
    """In-place self-distillation inside the joint step: the step's first width (the widest) learns
    the task alone, and its logits, detached, teach every other width of the step, whose objective
    becomes `(1 - weight) * task loss + weight * distillation loss` (the teacher's predictions carry
    no gradient: the student follows the teacher, not the other way round).

    Only the teacher's logits are kept while the narrower widths run, in their dtype (bf16 under
    autocast): for a language model that is (batch, seq_len, vocabulary) per step. The distillation
    loss is computed in float32 over the whole vocabulary, a float32 copy of those logits or two.

    Args:
        weight: the mix in [0, 1]: 0 is the task loss alone, 1 the distillation loss alone (the
            in-place distillation of slimmable networks).
        loss: "kl": KL(teacher || student); "soft_ce": the student's cross-entropy with the
            teacher's probabilities (the KL plus the teacher's entropy: the same gradient, a value
            comparable with the task loss).
        temperature: both distributions are softened by T and the loss multiplied by T^2 (Hinton
            et al.), which keeps the gradient's scale comparable across temperatures.

    Example (YAML, `model.init_args`):
        distillation: {weight: 0.5, loss: kl, temperature: 1.0}
    """

    weight: float = 0.5
    loss: Literal["kl", "soft_ce"] = "kl"
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"distillation.weight must be in [0, 1], got {self.weight}")
        if self.loss not in ("kl", "soft_ce"):
            raise ValueError(f'distillation.loss must be "kl" or "soft_ce", got {self.loss!r}')
        if self.temperature <= 0:
            raise ValueError(f"distillation.temperature must be > 0, got {self.temperature}")

    def objective(self, task: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """What a student width back-propagates: its task loss mixed with the distillation loss of
        its logits against the teacher's (detached here, whatever the caller passes)."""
        kd = distillation_loss(student, teacher.detach(), self.loss, self.temperature)
        return (1.0 - self.weight) * task + self.weight * kd


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, loss: str = "kl", temperature: float = 1.0
) -> torch.Tensor:
    """The mean over rows of KL(softmax(teacher / T) || softmax(student / T)) ("kl") or of
    -sum softmax(teacher / T) * log_softmax(student / T) ("soft_ce"), times T^2; a 0-d float32 tensor.

    Args:
        student, teacher: logits of the same shape (..., classes), e.g. (B, L, V) or (B, C); any float dtype.
    """
    t = temperature
    log_p = F.log_softmax(student.float().flatten(0, -2) / t, dim=-1)  # (N, C)
    log_q = F.log_softmax(teacher.float().flatten(0, -2) / t, dim=-1)  # (N, C)
    if loss == "kl":
        out = F.kl_div(log_p, log_q, reduction="batchmean", log_target=True)
    elif loss == "soft_ce":
        out = -(log_q.exp() * log_p).sum(-1).mean()
    else:
        raise ValueError(f'loss must be "kl" or "soft_ce", got {loss!r}')
    return out * (t * t)


def joint_backward(
    loss_fn: LossFn,
    batch: Any,
    widths: Sequence[Width],
    weights: Sequence[float],
    *,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    gradient_sync: Callable[[bool], contextlib.AbstractContextManager] | None = None,
    sync_last: bool = True,
    direct_weight_grads: bool = False,
    distillation: Distillation | None = None,
) -> torch.Tensor:
    """Forward and backward of `weights[i] * loss_fn(batch, widths[i])` for every i, in order;
    returns the unweighted losses, detached, (len(widths),). With `distillation`, every width after
    the first back-propagates `distillation.objective` against the first width's detached logits
    instead, and the losses returned are still the task losses.

    Args:
        loss_fn: the model's own loss at a width (e.g. `lambda b, w: model.loss(b, w)`); with
            `distillation`, returning (loss, logits) (`model.loss(..., return_logits=True)`).
        batch: what `loss_fn` takes.
        widths: the widths to train, usually `WidthPolicy(...)(step)[0]`; with `distillation`, the
            teacher first.
        weights: one factor per width; fold any scaling (1 / accumulation) into them.
        backward: runs the backward of a weighted loss (Lightning's `manual_backward`, so that its
            precision plugin scales fp16 losses).
        gradient_sync: `gradient_sync(enabled)` is a context in which backward passes reduce
            gradients across ranks or not (`parallel.gradient_sync`); None in one process.
        sync_last: reduce on the last width's backward (the last micro-batch of an optimizer step);
            the other widths never reduce, so gradients are reduced once per optimizer step, not
            once per width.
        direct_weight_grads: add each width's weight gradients straight into the used block of
            `.grad` (`lit_matmamba.models.nested_linear`); one process only.
        distillation: in-place self-distillation from the first width (`Distillation`); None: off.
    """
    if len(widths) != len(weights):
        raise ValueError(f"{len(widths)} widths but {len(weights)} weights")
    losses = []
    last = len(widths) - 1
    teacher = None  # the first width's logits, detached: the only thing kept across widths
    for i, (width, weight) in enumerate(zip(widths, weights)):
        sync = gradient_sync(sync_last and i == last) if gradient_sync else contextlib.nullcontext()
        with sync, direct_grads(direct_weight_grads):
            if distillation is None:
                loss = objective = loss_fn(batch, width)
            else:
                loss, logits = loss_fn(batch, width)
                if teacher is None:
                    objective, teacher = loss, logits.detach()
                else:
                    objective = distillation.objective(loss, logits, teacher)
                del logits  # the student's logits go with its graph, after its backward
            backward(objective * weight)
        losses.append(loss.detach())
    return torch.stack(losses)


def capture_joint_step(
    loss_fn: LossFn,
    example: Any,
    widths: Sequence[Width],
    weights: Sequence[float],
    params: Iterable[torch.Tensor],
    *,
    max_grad_norm: float | None = 1.0,
    autocast_dtype: torch.dtype | None = torch.bfloat16,
    direct_weight_grads: bool = True,
    distillation: Distillation | None = None,
) -> GraphedTrainStep:
    """The joint step (`joint_backward`) and gradient clipping captured as one CUDA graph for
    batches shaped like `example` (one GPU, one process). Call the result with a batch: it
    returns the per-width losses and the gradient norm and leaves the gradients in `.grad` for the
    optimizer, which runs outside the graph. The widths are fixed at capture, so a recipe that
    samples widths every step cannot be captured; distillation can (the teacher's logits are one
    more buffer of the graph).

    Example:
        step = capture_joint_step(model.loss, ids, [768, 384, 192, 96], [0.25] * 4, model.parameters())
        losses, grad_norm = step(ids)  # (4,), ()
        optimizer.step()
    """

    def loss_in_autocast(batch: Any, width: Width) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        with graph_autocast(autocast_dtype):
            return loss_fn(batch, width)

    def forward_backward(batch: Any) -> torch.Tensor:
        return joint_backward(
            loss_in_autocast,
            batch,
            widths,
            weights,
            direct_weight_grads=direct_weight_grads,
            distillation=distillation,
        )

    return GraphedTrainStep(forward_backward, example, params, max_grad_norm)
