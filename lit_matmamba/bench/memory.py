"""Peak GPU memory of the joint training step against the widest width's own training step."""

from __future__ import annotations

import time

import torch

from lit_matmamba.training.joint import joint_backward

from .common import build_lm, random_ids, require_cuda, write_results

GIB = 2**30


def memory(
    preset: str = "lm-1.4b",
    batch: int = 8,
    seq: int = 1024,
    chunk_size: int | None = None,
    out: str | None = "memory.json",
) -> dict:
    """Peak memory of the joint step of every granularity, against each width trained alone.

    A width trained alone runs the same joint step (`training.joint`) with that one width, so the
    two differ only in the widths. Each is measured from a clean start, with autograd's and with
    direct weight gradients: forward and backward alone, and the whole training step (clipping,
    fused AdamW step) with the optimizer state allocated. The joint step's peak should equal the
    widest width's whole step: each width's activations are freed before the next width runs.

    Peaks are reported as allocated (the caching allocator's blocks) and requested (the bytes asked
    for), so that a difference can be told apart from the allocator's rounding. cuBLAS keeps a
    workspace per stream, allocated through PyTorch's allocator and never freed; they are cleared
    before each measurement, so run this in a process of its own. Set PYTORCH_CUDA_ALLOC_CONF
    (e.g. expandable_segments:True) to measure another allocator setting.

    Args:
        preset: model preset (`MatMambaConfig.presets()`).
        batch: sequences per batch.
        seq: tokens per sequence.
        chunk_size: SSD chunk size (default: the preset's).
        out: JSON file for the results (None: do not write).
    """
    require_cuda()
    t0 = time.time()
    model = build_lm(preset, chunk_size)
    grans = list(model.config.default_granularities())
    ids = random_ids(model, batch, seq)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def loss_in_autocast(batch_ids: torch.Tensor, width: int) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model.loss(batch_ids, width)

    def forward_backward(widths: list[int], direct: bool) -> None:
        joint_backward(
            loss_in_autocast, ids, widths, [1.0 / len(widths)] * len(widths), direct_weight_grads=direct
        )

    def train_step(widths: list[int], direct: bool) -> None:
        forward_backward(widths, direct)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def say(msg: str) -> None:  # progress, so that a stopped run shows how far it got
        print(f"[{time.time() - t0:6.1f} s] {msg}", flush=True)

    res: dict = dict(
        preset=preset,
        chunk_size=model.config.chunk_size,
        batch=batch,
        seq=seq,
        device=torch.cuda.get_device_name(),
    )
    modes = (("direct", True), ("autograd", False))
    for w in grans:  # warm-up (autotuning), then the measurements, from no gradients
        forward_backward([w], False)
        model.zero_grad(set_to_none=True)
    say("warm-up done")
    for mode, direct in modes:
        for w in grans:
            peak, req = _peak(lambda w=w, d=direct: forward_backward([w], d))
            res.setdefault(f"single_{mode}_peak_gib", {})[w] = peak
            res.setdefault(f"single_{mode}_requested_peak_gib", {})[w] = req
            model.zero_grad(set_to_none=True)
            say(f"{mode}, width {w}: peak {peak:.3f} GiB (requested {req:.3f} GiB)")
    train_step(grans, True)  # creates the optimizer state
    res["optimizer_state_gib"] = (
        sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()) / GIB
    )
    widest = max(grans, key=lambda w: res["single_direct_peak_gib"][w])
    res["single_train_width"] = widest
    for mode, direct in modes:
        res[f"joint_{mode}_peak_gib"], res[f"joint_{mode}_requested_peak_gib"] = _peak(
            lambda d=direct: train_step(grans, d)
        )
        res[f"single_train_{mode}_peak_gib"], res[f"single_train_{mode}_requested_peak_gib"] = _peak(
            lambda d=direct: train_step([widest], d)
        )
    write_results(out, res)
    for mode, _ in modes:
        joint, single = res[f"joint_{mode}_peak_gib"], res[f"single_train_{mode}_peak_gib"]
        parts = max(res[f"single_{mode}_peak_gib"].values()) + res["optimizer_state_gib"]
        print(
            f"{mode:8s} weight gradients: joint step peak {joint:.4f} GiB; width {widest} trained alone "
            f"{single:.4f} GiB ({(joint - single) * 1024:+.1f} MiB); its forward+backward peak + optimizer "
            f"state {parts:.4f} GiB ({(joint - parts) * 1024:+.1f} MiB); requested "
            f"{res[f'joint_{mode}_requested_peak_gib']:.4f} vs {res[f'single_train_{mode}_requested_peak_gib']:.4f} GiB"
        )
    return res


def _peak(fn) -> tuple[float, float]:
    """(peak allocated GiB, peak requested GiB) during fn, from cleared cuBLAS workspaces."""
    torch.cuda.synchronize()
    if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
        torch._C._cuda_clearCublasWorkspaces()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    requested = torch.cuda.memory_stats().get("requested_bytes.all.peak", float("nan")) / GIB
    return torch.cuda.max_memory_allocated() / GIB, requested
