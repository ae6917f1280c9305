"""Training and inference speed on one GPU, in one process: stock mamba-ssm against the nested model."""

from __future__ import annotations

import copy
import gc
import time

import torch
import torch.nn.functional as F

from lit_matmamba.graphs import GraphedForward
from lit_matmamba.kernels.mamba_ssm_compat import clear_autotuning
from lit_matmamba.training.joint import capture_joint_step, joint_backward

from .common import (
    PEAK_FLOPS,
    build_lm,
    matmul_ceiling,
    random_ids,
    require_cuda,
    stock_lm,
    time_ms,
    write_results,
)


def speed(
    preset: str = "lm-1.4b",
    batch: int = 8,
    seq: int = 1024,
    reps: int = 10,
    stock: bool = True,
    graphs: bool = True,
    joint_only: bool = False,
    chunk_size: int | None = None,
    ssd_configs: str = "auto",
    out: str | None = "speed.json",
) -> dict:
    """Time stock mamba-ssm and the nested model at every granularity, and the joint step.

    Rows: (a) stock mamba-ssm's Mamba2 LM, one standalone model per granularity (its inner width),
    training step and inference forward, under bf16 autocast and with bf16 weights; (b) the nested
    model at each granularity, training and inference, eager and CUDA-graphed (also on frozen bf16
    weights, as served); (c) the joint training step of all granularities (`training.joint`): eager
    with autograd's and with direct weight gradients, and CUDA-graphed, each with clipping and a
    fused AdamW step. Times are medians of CUDA-event-timed repeats after warm-up.

    Model FLOPs for MFU: 6 x tokens x matmul parameters used at the width (LM head included) plus 3 x
    the SSD scan's forward FLOPs (`lit_matmamba.models.flops`); inference 2x and 1x. MFU is against
    the dense bf16 datasheet peak (989 TFLOP/s on H100 and H200) and the bf16 matmul ceiling
    measured in the same run.

    mamba-ssm's autotuned kernels are shared by the stock and nested models and keep their choices
    per process, so they are cleared before each stock model and before the nested model: each
    tunes them for its own calls, as it would alone. The stock models run without pinned SSD
    configurations; the nested model with `ssd_configs`.

    Args:
        preset: model preset (`MatMambaConfig.presets()`).
        batch: sequences per batch.
        seq: tokens per sequence.
        reps: timed repeats per measurement (the median is reported).
        stock: time the stock mamba-ssm models too (needs mamba-ssm's model classes).
        graphs: time the CUDA-graphed forwards and joint step too.
        joint_only: time only the graphed joint step.
        chunk_size: SSD chunk size of the nested and the stock models (default: the preset's).
        ssd_configs: "auto", "off" or a table's path (see `lit_matmamba.kernels.pin_ssd_configs`).
        out: JSON file for the full results (None: do not write).
    """
    require_cuda()
    from lit_matmamba.kernels import pin_ssd_configs

    torch.backends.cuda.matmul.allow_tf32 = True
    amp = dict(device_type="cuda", dtype=torch.bfloat16)
    t0 = time.time()
    model = build_lm(preset, chunk_size)
    cfg = model.config
    grans = list(cfg.default_granularities())
    tokens = batch * seq
    ids = random_ids(model, batch, seq)
    results: dict = dict(
        preset=preset,
        batch=batch,
        seq=seq,
        chunk_size=cfg.chunk_size,
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        ssd_configs=ssd_configs,
    )
    results["matmul_tflops"] = matmul_ceiling() / 1e12
    print(f"bf16 matmul ceiling: {results['matmul_tflops']:.0f} TFLOP/s", flush=True)

    def mfu(ms: float, flops_per_token: float) -> float:
        return flops_per_token * tokens / (ms / 1e3) / PEAK_FLOPS

    def train_flops(width: int) -> float:
        return model.flops_per_token(width, training=True, seq_len=seq)

    def stock_loss(m: torch.nn.Module) -> torch.Tensor:
        """torch's cross-entropy on the stock model, as a mamba-ssm training script would do it."""
        logits = m(ids[:, :-1]).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())

    rows = []
    if stock and not joint_only:
        for w in grans:
            clear_autotuning(pins=False)
            ref = stock_lm(cfg, w)

            def train_step(m=ref):
                with torch.autocast(**amp):
                    loss = stock_loss(m)
                loss.backward()

            def infer(m=ref):
                with torch.no_grad(), torch.autocast(**amp):
                    m(ids[:, :-1])

            row = dict(kind="stock", width=w, train_ms=time_ms(train_step, reps=reps))
            row["infer_ms"] = time_ms(infer, reps=reps)
            row["peak_gib"] = _peak_gib(train_step)
            ref.zero_grad(set_to_none=True)
            # The same model with bf16 weights, as it would be deployed: no casts in the forward.
            ref_bf16 = copy.deepcopy(ref).to(torch.bfloat16)
            row["infer_bf16_weights_ms"] = time_ms(lambda m=ref_bf16: infer(m), reps=reps)
            row["train_mfu"] = mfu(row["train_ms"], train_flops(w))
            rows.append(row)
            _print_row(row)
            del ref, ref_bf16
            gc.collect()
            torch.cuda.empty_cache()

    clear_autotuning()  # forgets the stock models' choices, keeps (re-applies) pinned configurations
    results["pinned_ssd_configs"] = pin_ssd_configs(ssd_configs)
    for w in [] if joint_only else grans:

        def train_step(w=w):
            with torch.autocast(**amp):
                loss = model.loss(ids, w)
            loss.backward()

        def infer(w=w):
            with torch.no_grad(), torch.autocast(**amp):
                model(ids[:, :-1], width=w)

        row = dict(kind="nested", width=w, train_ms=time_ms(train_step, reps=reps))
        model.zero_grad(set_to_none=True)
        row["infer_ms"] = time_ms(infer, reps=reps)
        row["peak_gib"] = _peak_gib(train_step)
        model.zero_grad(set_to_none=True)
        row["train_mfu"] = mfu(row["train_ms"], train_flops(w))
        if graphs:
            graphed = GraphedForward(model, ids[:, :-1], width=w)
            row["infer_graph_ms"] = time_ms(lambda g=graphed: g(ids[:, :-1]), reps=reps)
            del graphed
            graphed = GraphedForward(model, ids[:, :-1], width=w, frozen_weights=True)
            row["infer_graph_frozen_ms"] = time_ms(lambda g=graphed: g(ids[:, :-1]), reps=reps)
            del graphed
        rows.append(row)
        _print_row(row)
        torch.cuda.empty_cache()

    # The joint step: every granularity forward and backward, clipping, one fused AdamW step.
    weights = [1.0 / len(grans)] * len(grans)
    joint_flops = sum(train_flops(w) for w in grans)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    params_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    joint: dict = dict(params_gib=params_gib, optimizer_state_gib=2 * params_gib)
    results["joint"] = joint

    def loss_in_autocast(batch_ids: torch.Tensor, width: int) -> torch.Tensor:
        with torch.autocast(**amp):
            return model.loss(batch_ids, width)

    def joint_eager(direct: bool) -> tuple[torch.Tensor, torch.Tensor]:
        losses = joint_backward(loss_in_autocast, ids, grans, weights, direct_weight_grads=direct)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return losses, norm

    # The first step creates the optimizer state before memory is measured. Its losses and gradient
    # norm, from the seeded initial weights, let two runs (other kernels, other configurations) be
    # compared for equal results, not only for time.
    losses, norm = joint_eager(True)
    joint["first_step"] = dict(losses=[float(x) for x in losses], grad_norm=float(norm))

    def record(name: str, ms: float, peak: float, **extra) -> None:
        joint[name] = dict(ms=ms, tokens_per_s=tokens / (ms / 1e3), mfu=mfu(ms, joint_flops), peak_gib=peak)
        joint[name].update(extra)
        print(f"joint {name:15s} {ms:8.1f} ms  MFU {joint[name]['mfu']:.1%}  peak {peak:.1f} GiB", flush=True)

    for name, direct in () if joint_only else (("eager_autograd", False), ("eager_direct", True)):
        ms = time_ms(lambda d=direct: joint_eager(d), reps=reps)
        record(name, ms, _peak_gib(lambda d=direct: joint_eager(d)))
    torch.cuda.empty_cache()
    if graphs:
        step = capture_joint_step(model.loss, ids, grans, weights, model.parameters(), max_grad_norm=1.0)

        def joint_graph():
            step(ids)
            opt.step()

        ms = time_ms(joint_graph, reps=reps)
        # A replay allocates nothing: its activations live in the graph's private pool, which stays
        # reserved, so the graphed step's memory is what is reserved, not the allocated peak.
        peak = _peak_gib(joint_graph)
        torch.cuda.empty_cache()
        record("graph", ms, peak, reserved_gib=torch.cuda.memory_reserved() / 2**30)
        del step

    # Speedup at a width: the faster stock inference (autocast or bf16 weights) over the faster
    # graphed nested one (casting per replay or frozen bf16 weights).
    stock_rows = {r["width"]: r for r in rows if r["kind"] == "stock"}
    for r in rows:
        graphed = [r[k] for k in ("infer_graph_ms", "infer_graph_frozen_ms") if k in r]
        if r["kind"] == "nested" and r["width"] in stock_rows and graphed:
            s = stock_rows[r["width"]]
            r["speedup_vs_stock"] = min(s["infer_ms"], s["infer_bf16_weights_ms"]) / min(graphed)
    results["rows"] = rows
    results["wall_s"] = time.time() - t0
    write_results(out, results)
    _print_summary(results)
    return results


def _peak_gib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def _print_row(r: dict) -> None:
    nan = float("nan")
    print(
        f"{r['kind']:6s} w={r['width']:5d} train {r['train_ms']:8.1f} ms  infer {r['infer_ms']:7.1f} ms  "
        f"bf16 weights {r.get('infer_bf16_weights_ms', nan):7.1f} ms  graph {r.get('infer_graph_ms', nan):7.1f} ms  "
        f"frozen {r.get('infer_graph_frozen_ms', nan):7.1f} ms  peak {r['peak_gib']:5.1f} GiB",
        flush=True,
    )


def _print_summary(results: dict) -> None:
    """The table last: the device tool and a terminal show the end of the output."""
    nan = float("nan")
    print(
        f"\n== {results['preset']} chunk {results['chunk_size']} batch {results['batch']} seq {results['seq']} "
        f"on {results['device']} (matmul ceiling {results['matmul_tflops']:.0f} TFLOP/s)"
    )
    # infer ms: eager under autocast; bf16 w: stock with bf16 weights; graph: nested, graphed;
    # frozen: graphed on bf16 weights cast once; speedup: stock's faster over ours' faster.
    print(
        f"{'kind':7s} {'width':>6s} {'train ms':>9s} {'infer ms':>9s} {'bf16 w':>8s} {'graph ms':>9s} "
        f"{'frozen':>8s} {'speedup':>8s} {'MFU':>6s} {'GiB':>6s}"
    )
    for r in results["rows"]:
        print(
            f"{r['kind']:7s} {r['width']:6d} {r['train_ms']:9.1f} {r['infer_ms']:9.1f} "
            f"{r.get('infer_bf16_weights_ms', nan):8.1f} {r.get('infer_graph_ms', nan):9.1f} "
            f"{r.get('infer_graph_frozen_ms', nan):8.1f} {r.get('speedup_vs_stock', nan):7.2f}x "
            f"{r['train_mfu']:6.1%} {r['peak_gib']:6.1f}"
        )
    joint = results["joint"]
    stock_sum = sum(r["train_ms"] for r in results["rows"] if r["kind"] == "stock")
    for name in ("eager_autograd", "eager_direct", "graph"):
        if name in joint:
            ratio = joint[name]["ms"] / stock_sum if stock_sum else nan
            print(
                f"joint {name:15s} {joint[name]['ms']:8.1f} ms  MFU {joint[name]['mfu']:6.1%}  "
                f"/ stock sum {ratio:.2f}  peak {joint[name]['peak_gib']:.1f} GiB"
            )
