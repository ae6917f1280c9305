"""Peak GPU memory of the joint training step against the largest single width's step plus the
optimizer state (issue 5's memory target), each measured from the same clean start. A single
width's step is the joint step's code with that one width, so the two differ only in the widths.
The target is measured two ways: the single width's forward and backward peak plus the state's
bytes, and that width's whole training step (clipping, optimizer step) with the state allocated.
Set PYTORCH_CUDA_ALLOC_CONF (e.g. expandable_segments:True) to measure another allocator setting;
the JSON records it.

    python scripts/gpu_memory_check.py --preset lm-1.4b --batch 8 --out $OUT/memory-1.4b.json

Why a script of its own: cuBLAS keeps a workspace per stream it has run on, allocated through
PyTorch's caching allocator and never freed, so in a long benchmark that captured CUDA graphs (on
side streams) before, every later peak includes workspaces of earlier streams. Here the workspaces
are cleared before each measurement, and nothing else runs in the process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_matmamba import MatMambaConfig, MatMambaLM  # noqa: E402
from lit_matmamba.models import direct_weight_grads  # noqa: E402

GIB = 2**30


def peak(fn) -> tuple[float, float, float]:
    """(peak allocated GiB during fn, allocated GiB before it, peak requested GiB during fn), from
    cleared cuBLAS workspaces. Allocated counts the caching allocator's blocks, which can exceed the
    bytes asked for (a block is not split when the rest would be small); requested counts the bytes
    asked for, so the two show how much of a difference is the allocator's rounding."""
    torch.cuda.synchronize()
    if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
        torch._C._cuda_clearCublasWorkspaces()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated() / GIB
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    requested = torch.cuda.memory_stats().get("requested_bytes.all.peak", float("nan")) / GIB
    return torch.cuda.max_memory_allocated() / GIB, before, requested


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="lm-1.4b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--chunk-size", type=int, default=None, help="SSD chunk size (default: the preset's)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "memory.json"))
    args = ap.parse_args()
    t0 = time.time()
    torch.manual_seed(0)
    with torch.device("cuda"):
        overrides = {} if args.chunk_size is None else dict(chunk_size=args.chunk_size)
        model = MatMambaLM(MatMambaConfig.from_name(args.preset, **overrides))
    grans = list(model.config.granularities)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq + 1), device="cuda")

    def loss_at(width, direct):
        with torch.autocast("cuda", dtype=torch.bfloat16), direct_weight_grads(direct):
            return model.loss(ids, width)

    def forward_backward(widths, direct):
        """The training step's forward and backward (`NestedModule.training_step`): each width's
        loss, weighted, backpropagated before the next width's forward."""
        for w in widths:
            (loss_at(w, direct) * (1.0 / len(widths))).backward()

    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def train_step(widths, direct):
        """A whole training step over `widths`: forward and backward, clipping, the AdamW step."""
        forward_backward(widths, direct)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def say(msg: str) -> None:  # progress, so that a stopped run shows where it was
        print(f"[{time.time() - t0:6.1f} s] {msg}", flush=True)

    out = dict(
        preset=args.preset,
        chunk_size=model.config.chunk_size,
        batch=args.batch,
        seq=args.seq,
        device=torch.cuda.get_device_name(),
        alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
    )
    modes = (("direct", True), ("autograd", False))
    for w in grans:  # warm-up (autotuning), then the measurement, from no gradients
        forward_backward([w], False)
        model.zero_grad(set_to_none=True)
        say(f"warm-up width {w} done")
    # A single width's step is the same code with one width (weight 1): what training that width
    # alone runs, in each mode of weight gradients.
    for mode, direct in modes:
        singles, singles_req = {}, {}
        for w in grans:
            singles[w], out["single_allocated_before_gib"], singles_req[w] = peak(
                lambda w=w, d=direct: forward_backward([w], d)
            )
            model.zero_grad(set_to_none=True)
            say(f"{mode}, width {w}: peak {singles[w]:.3f} GiB (requested {singles_req[w]:.3f} GiB)")
        out[f"single_{mode}_peak_gib"] = singles
        out[f"single_{mode}_requested_peak_gib"] = singles_req
    train_step(grans, True)  # creates the optimizer state
    say("optimizer state created")
    state_gib = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()) / GIB
    out["optimizer_state_gib"] = state_gib
    for mode, direct in modes:
        (
            out[f"joint_{mode}_peak_gib"],
            out["allocated_before_gib"],
            out[f"joint_{mode}_requested_peak_gib"],
        ) = peak(lambda d=direct: train_step(grans, d))
        out[f"target_{mode}_gib"] = max(out[f"single_{mode}_peak_gib"].values()) + state_gib
        out[f"target_{mode}_requested_gib"] = (
            max(out[f"single_{mode}_requested_peak_gib"].values()) + state_gib
        )
        say(
            f"joint, {mode}: peak {out[f'joint_{mode}_peak_gib']:.4f} GiB vs target {out[f'target_{mode}_gib']:.4f} "
            f"(requested {out[f'joint_{mode}_requested_peak_gib']:.4f} vs {out[f'target_{mode}_requested_gib']:.4f})"
        )
    # The same target measured as a whole: the largest width trained alone, its step with the
    # clipping and the optimizer step, from the same start (optimizer state allocated). The sum
    # above adds the state's bytes to a peak measured without it, so the allocator's rounding
    # around the state's blocks counts only on the joint step's side.
    largest = max(grans, key=lambda w: out["single_direct_peak_gib"][w])
    out["single_train_width"] = largest
    for mode, direct in modes:
        out[f"single_train_{mode}_peak_gib"], _, out[f"single_train_{mode}_requested_peak_gib"] = peak(
            lambda d=direct: train_step([largest], d)
        )
        say(
            f"width {largest} trained alone, {mode}: peak {out[f'single_train_{mode}_peak_gib']:.4f} GiB "
            f"(requested {out[f'single_train_{mode}_requested_peak_gib']:.4f})"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    for mode, _ in modes:
        over = (out[f"joint_{mode}_peak_gib"] - out[f"target_{mode}_gib"]) * 1024
        over_req = (out[f"joint_{mode}_requested_peak_gib"] - out[f"target_{mode}_requested_gib"]) * 1024
        print(
            f"{mode} weight gradients: joint peak {out[f'joint_{mode}_peak_gib']:.4f} GiB vs largest single width "
            f"+ optimizer state {out[f'target_{mode}_gib']:.4f} GiB: {over:+.1f} MiB allocated, "
            f"{over_req:+.4f} MiB requested"
        )
        over_train = (out[f"joint_{mode}_peak_gib"] - out[f"single_train_{mode}_peak_gib"]) * 1024
        print(
            f"{mode} weight gradients: joint peak vs width {largest}'s own training step (with its optimizer "
            f"state) {out[f'single_train_{mode}_peak_gib']:.4f} GiB: {over_train:+.1f} MiB allocated"
        )


if __name__ == "__main__":
    main()
