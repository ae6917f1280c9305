"""Optimizer and schedule defaults (the paper's: AdamW, warmup then cosine decay)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


def param_groups(model: nn.Module) -> list[dict]:
    """Decay matrices only: biases, norm weights, A_log, D, dt_bias and positions are exempt
    (1-D parameters or ones marked `_no_weight_decay`). The decayed groups take the optimizer's
    own `weight_decay`.

    The mixers' parameters (names with `.mixer.`) are grouped apart from the rest: tensor
    parallelism shards the mixers and replicates the rest, and a foreach optimizer step cannot
    take both in one group. The groups are the same under every strategy, so that optimizer and
    learning-rate schedule state move between them (`lit_matmamba.training.parallel`).
    Empty groups are left out."""
    groups: dict[tuple[bool, bool], list] = {
        key: [] for key in ((True, True), (True, False), (False, True), (False, False))
    }
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim < 2 or getattr(p, "_no_weight_decay", False))
        groups[decay, ".mixer." in f".{name}"].append(p)
    return [
        {"params": params} if decay else {"params": params, "weight_decay": 0.0}
        for (decay, _), params in groups.items()
        if params
    ]


class WarmupCosine(torch.optim.lr_scheduler.LambdaLR):
    """Linear warmup for `warmup_steps`, then cosine decay to `min_lr_ratio` x the peak at
    `max_steps` (held there after). `max_steps` None: the trainer's total number of optimizer
    steps, filled in by the training module, so the schedule length is stated once."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int = 1000,
        max_steps: int | None = None,
        min_lr_ratio: float = 0.1,
    ) -> None:
        self.warmup_steps, self.max_steps, self.min_lr_ratio = warmup_steps, max_steps, min_lr_ratio
        if max_steps is not None:
            self._check()
        super().__init__(optimizer, self.factor)

    def _check(self) -> None:
        if self.max_steps <= self.warmup_steps:
            raise ValueError(f"max_steps ({self.max_steps}) must exceed warmup_steps ({self.warmup_steps})")

    def set_max_steps(self, max_steps: int) -> None:
        self.max_steps = max_steps
        self._check()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume: the step count is the checkpoint's, the schedule's shape this run's. A resume whose
        `max_steps` (e.g. a larger `trainer.max_steps`), `warmup_steps` or `min_lr_ratio` differ from
        the checkpoint's rebuilds the schedule for the new values, from the step reached, and
        says so once with the LR before and after (the optimizer's restored LR is set to the new
        schedule's). To continue the old schedule instead, give the old `max_steps` explicitly."""
        shape = ("warmup_steps", "max_steps", "min_lr_ratio")
        mine = {k: getattr(self, k) for k in shape}
        saved = {k: state_dict.get(k, mine[k]) for k in shape}
        super().load_state_dict(state_dict)
        self.__dict__.update(mine)
        if saved == mine:
            return
        before = self.optimizer.param_groups[0]["lr"]
        lrs = [base * self.factor(self.last_epoch) for base in self.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = lrs
        changed = ", ".join(f"{k} {saved[k]} -> {mine[k]}" for k in shape if saved[k] != mine[k])
        warnings.warn(
            f"resuming at step {self.last_epoch} with another LR schedule than the checkpoint's "
            f"({changed}): the schedule is rebuilt for the new values, the LR goes from {before:.4g} "
            f"to {lrs[0]:.4g}. To continue the checkpoint's schedule instead, set "
            f"model.init_args.scheduler.init_args.max_steps to {saved['max_steps']}.",
            stacklevel=2,
        )

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.max_steps is None:  # before the module has set it: hold the peak
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / (self.max_steps - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw(
    params: Iterable, lr: float = 6e-4, betas: tuple[float, float] = (0.9, 0.95), weight_decay: float = 0.1
) -> torch.optim.AdamW:
    """The default optimizer; `params` are the module's parameter groups."""
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
