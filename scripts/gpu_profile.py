"""Profile one eager joint training step (every granularity fwd+bwd + AdamW) on the GPU and write
the kernel table (by CUDA time) and a host-vs-device summary. Weight gradients are direct (as the
training module uses on one GPU) unless --autograd-grads. With --infer WIDTH, profile one
inference forward at that width instead (no gradients, bf16 autocast, as gpu_bench.py times it).

    python scripts/gpu_profile.py --preset lm-1.4b --batch 8 --out $OUT/profile-1.4b.txt
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lit_matmamba import MatMambaConfig, MatMambaLM  # noqa: E402
from lit_matmamba.models import direct_weight_grads  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="lm-1.4b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--chunk-size", type=int, default=None, help="SSD chunk size (default: the preset's)")
    ap.add_argument("--autograd-grads", action="store_true", help="plain autograd weight gradients")
    ap.add_argument("--infer", type=int, metavar="WIDTH", help="profile an inference forward at WIDTH")
    ap.add_argument(
        "--glue",
        action="store_true",
        help="also attribute copies, fills, adds and reductions to shapes and call sites",
    )
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "profile.txt"))
    args = ap.parse_args()
    with torch.device("cuda"):
        overrides = {} if args.chunk_size is None else dict(chunk_size=args.chunk_size)
        model = MatMambaLM(MatMambaConfig.from_name(args.preset, **overrides))
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq + 1), device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    grans = model.config.granularities

    def train_step():
        for w in grans:
            with torch.autocast("cuda", dtype=torch.bfloat16), direct_weight_grads(not args.autograd_grads):
                loss = model.loss(ids, width=w)
            (loss / len(grans)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def infer_step():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(ids[:, :-1], width=args.infer)

    step = train_step if args.infer is None else infer_step
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(
        activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
        record_shapes=args.glue,
        with_stack=args.glue,
    ) as prof:
        step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    # Kernel events carry device time; CPU-side ops report the same time again, so count kernels only.
    cuda_total = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 1e3
    cpu_total = sum(e.self_cpu_time_total for e in events) / 1e3
    table = events.table(sort_by="self_cuda_time_total", row_limit=35)
    what = (
        f"inference forward at width {args.infer}"
        if args.infer is not None
        else f"joint step, {'autograd' if args.autograd_grads else 'direct'} weight grads"
    )
    summary = (
        f"{args.preset} chunk {model.config.chunk_size} batch {args.batch} seq {args.seq} "
        f"({what}): device time {cuda_total:.1f} ms, "
        f"host time {cpu_total:.1f} ms, kernels launched {sum(e.count for e in events if e.device_type.name == 'CUDA')}"
    )
    text = summary + "\n\n" + table
    if args.glue:
        text += glue_tables(prof)
    Path(args.out).write_text(text)
    print(table)
    print(summary)


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


def glue_tables(prof) -> str:
    """Where the glue kernels come from: the glue ops grouped by their input shapes."""
    glue = [
        e for e in prof.key_averages(group_by_input_shape=True) if e.key in GLUE and e.device_time_total > 0
    ]
    glue.sort(key=lambda e: e.device_time_total, reverse=True)
    out = ["\n\n## glue ops by input shapes (top 25 by CUDA time)\n"]
    for e in glue[:25]:
        out.append(f"{e.key:14s} {e.device_time_total / 1e3:8.2f} ms  {e.count:5d} calls  {e.input_shapes}")
    return "\n".join(out)


if __name__ == "__main__":
    main()
