"""A torch.profiler table of one joint training step (or one inference forward) on the GPU."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity
from torch.profiler import profile as torch_profile

from lit_matmamba.training.joint import joint_backward

from .common import build_lm, random_ids, require_cuda

# Ops that move or combine data without model arithmetic: where their time comes from is worth a
# table of its own (`glue=True`).
GLUE = (
    "aten::copy_",
    "aten::add_",
    "aten::fill_",
    "aten::sum",
    "aten::zero_",
    "aten::cat",
    "aten::mul",
    "aten::add",
)


def profile(
    preset: str = "lm-1.4b",
    batch: int = 8,
    seq: int = 1024,
    chunk_size: int | None = None,
    direct_weight_grads: bool = True,
    infer_width: int | None = None,
    glue: bool = False,
    rows: int = 35,
    out: str | None = "profile.txt",
) -> str:
    """Profile one eager joint training step (every granularity forward and backward, a fused AdamW
    step) and print the kernels by GPU time, with device time, host time and kernel count.

    Args:
        preset: model preset (`MatMambaConfig.presets()`).
        batch: sequences per batch.
        seq: tokens per sequence.
        chunk_size: SSD chunk size (default: the preset's).
        direct_weight_grads: direct (width-proportional) weight gradients, as one-GPU training runs;
            false: autograd's.
        infer_width: profile one inference forward (bf16 autocast, no gradients) at this width
            instead of the training step.
        glue: also attribute copies, fills, adds and reductions to input shapes.
        rows: rows of the kernel table.
        out: text file for the summary and tables (None: do not write).
    """
    require_cuda()
    model = build_lm(preset, chunk_size)
    ids = random_ids(model, batch, seq)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    grans = list(model.config.default_granularities())

    def loss_in_autocast(batch_ids: torch.Tensor, width: int) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model.loss(batch_ids, width)

    def train_step() -> None:
        joint_backward(
            loss_in_autocast,
            ids,
            grans,
            [1 / len(grans)] * len(grans),
            direct_weight_grads=direct_weight_grads,
        )
        opt.step()
        opt.zero_grad(set_to_none=True)

    def infer_step() -> None:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(ids[:, :-1], width=infer_width)

    step = train_step if infer_width is None else infer_step
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch_profile(
        activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=glue, with_stack=glue
    ) as prof:
        step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    # Kernel events carry device time; CPU-side ops report the same time again: count kernels only.
    kernels = [e for e in events if e.device_type.name == "CUDA"]
    device_ms = sum(e.self_device_time_total for e in kernels) / 1e3
    host_ms = sum(e.self_cpu_time_total for e in events) / 1e3
    what = (
        f"inference forward at width {infer_width}"
        if infer_width is not None
        else f"joint step, {'direct' if direct_weight_grads else 'autograd'} weight gradients"
    )
    summary = (
        f"{preset} chunk {model.config.chunk_size} batch {batch} seq {seq} ({what}): device time "
        f"{device_ms:.1f} ms, host time {host_ms:.1f} ms, kernels launched {sum(e.count for e in kernels)}"
    )
    text = summary + "\n\n" + events.table(sort_by="self_cuda_time_total", row_limit=rows)
    if glue:
        text += _glue_table(prof)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    print(text[len(summary) + 2 :])
    print(summary)
    return text


def _glue_table(prof) -> str:
    """Where the glue kernels come from: the glue ops grouped by their input shapes."""
    ops = [
        e for e in prof.key_averages(group_by_input_shape=True) if e.key in GLUE and e.device_time_total > 0
    ]
    ops.sort(key=lambda e: e.device_time_total, reverse=True)
    lines = ["\n\n## glue ops by input shapes (top 25 by GPU time)\n"]
    for e in ops[:25]:
        lines.append(f"{e.key:14s} {e.device_time_total / 1e3:8.2f} ms  {e.count:5d} calls  {e.input_shapes}")
    return "\n".join(lines)
