"""Pure-PyTorch cross-entropy of the LM loss: the CPU path and the oracle for the kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy_ref(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100, reduction: str = "mean"
) -> torch.Tensor:
    """Mean cross-entropy over the rows whose target is not `ignore_index`:

        loss = mean over kept rows i of logsumexp(logits[i]) - logits[i, target[i]]

    i.e. `F.cross_entropy(logits.float(), target, ignore_index=ignore_index)` (mean reduction; NaN
    when every row is ignored, as torch). With reduction "none": the per-row losses, 0 for an
    ignored row.

    Args:
        logits: (N, V), any float dtype; computed in float32 (float64 for float64 logits, so that the
            float64 oracle keeps its precision).
        target: (N,), integer class indices in [0, V), or `ignore_index`.

    Returns a 0-d tensor ((N,) with reduction "none") in float32 (float64 for float64 logits). The
    gradient of logits is in their dtype.
    """
    acc = torch.promote_types(torch.float32, logits.dtype)
    return F.cross_entropy(logits.to(acc), target.long(), ignore_index=ignore_index, reduction=reduction)
