"""Benchmark on one GPU, in one process: stock mamba-ssm Mamba2 LMs at each nested inner width,
the project's nested model at each width (training and inference, eager and CUDA-graphed), the
joint four-granularity training step, and a bf16 matmul ceiling measured in the same run.

    python scripts/gpu_bench.py --preset lm-1.4b --batch 8 --seq 1024 --out $OUT/bench-1.4b.json

Model FLOPs (for MFU) = 6 x tokens x matmul parameters used at the width (LM head included) plus
3 x the SSD scan's forward FLOPs (see lit_matmamba/models/flops.py); inference: 2x and 1x.
MFU is against the H200's dense bf16 datasheet peak (989 TFLOP/s) and, in brackets, against the
matmul ceiling measured here. Times are medians of CUDA-event-timed repeats after warm-up.

mamba-ssm's autotuned kernels are shared by the stock and the nested models, and their choices are
kept per process: before each stock model and before the nested model they are cleared
(`clear_autotuning`), so each tunes them for its own calls as it would alone; the joint step runs the
nested model's calls and keeps its choices. Until the sixth run the stock full-width model's first
calls chose for everything after it. The nested model runs with the warps and stages tuned for this
GPU model where there are any (`kernels/ssd/tuned_configs.py`; `LIT_MATMAMBA_SSD_CONFIGS=off` for
mamba-ssm's own autotuning, or a table's path); the stock models never do.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_matmamba import MatMambaConfig, MatMambaLM  # noqa: E402
from lit_matmamba.graphs import GraphedForward, GraphedJointStep  # noqa: E402
from lit_matmamba.kernels.mamba_ssm_compat import clear_autotuning, use_tuned_configs  # noqa: E402
from lit_matmamba.models import direct_weight_grads  # noqa: E402
from lit_matmamba.models.flops import flops_per_token  # noqa: E402

PEAK = 989e12


def bench(fn, warmup: int = 3, reps: int = 10) -> float:
    """Median milliseconds of fn() over reps, CUDA events, after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def matmul_ceiling() -> float:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: a @ b, warmup=3, reps=20)
    return 2 * n**3 / (ms / 1e3)


class _Expand(float):
    """mamba-ssm 2.3.2 computes d_inner = (expand * d_model) // world_size, a float for a float
    expand, and fails to build layers with expand < 1; this expand multiplies to whole ints."""

    def __mul__(self, other):
        product = float(self) * other
        return int(product) if float(product).is_integer() else product

    __rmul__ = __mul__


def stock_lm(d_model: int, n_layer: int, vocab: int, expand: float, headdim: int, chunk_size: int):
    # Import mamba-ssm through the project's shim (which skips the package __init__). The stock
    # LM module still imports the Mamba-1 scan interface, which imports its CUDA extension; a
    # MAMBA_SKIP_CUDA_BUILD install lacks it and the Mamba2 LM never calls it: an empty stand-in.
    from lit_matmamba.kernels.mamba_ssm_compat import get_mamba_chunk_scan_combined

    get_mamba_chunk_scan_combined()
    sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    cfg = MambaConfig(
        d_model=d_model,
        n_layer=n_layer,
        vocab_size=vocab,
        d_intermediate=0,
        ssm_cfg=dict(
            layer="Mamba2",
            expand=_Expand(expand),
            headdim=headdim,
            chunk_size=chunk_size,
            use_mem_eff_path=False,
        ),
        rms_norm=True,
        residual_in_fp32=True,
        fused_add_norm=True,
        pad_vocab_size_multiple=16,
    )
    return MambaLMHeadModel(cfg, device="cuda")


def lm_loss(model, ids, width=None):
    """The nested model's own loss (`MatMambaLM.loss`: the Triton cross-entropy); the stock model
    (width None) gets torch's, as a mamba-ssm training script would."""
    if width is not None:
        return model.loss(ids, width)
    logits = model(ids[:, :-1]).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())


def peak_mem(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="lm-1.4b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--skip-stock", action="store_true")
    ap.add_argument("--skip-graphs", action="store_true")
    ap.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="SSD chunk size of the nested AND the stock models (default: the preset's)",
    )
    ap.add_argument(
        "--joint-only",
        action="store_true",
        help="time only the graphed joint step (no stock models, per-width rows or eager steps)",
    )
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    amp = dict(device_type="cuda", dtype=torch.bfloat16)
    results: dict = {
        "preset": args.preset,
        "batch": args.batch,
        "seq": args.seq,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        # Switches of experimental kernel paths (e.g. LIT_MATMAMBA_FUSED_DDA), as this run had them.
        "env": {k: v for k, v in os.environ.items() if k.startswith("LIT_MATMAMBA_")},
    }
    t0 = time.time()
    # The nested model's SSD kernels run with the warps and stages tuned for this GPU, as in training
    # (kernels/ssd/tuned_configs.py, or LIT_MATMAMBA_SSD_CONFIGS); the stock models' section clears
    # these pins, so that stock mamba-ssm tunes for itself.
    results["pinned_ssd_configs"] = use_tuned_configs(torch.cuda.get_device_name())
    results["matmul_tflops"] = matmul_ceiling() / 1e12
    print(f"bf16 matmul ceiling: {results['matmul_tflops']:.0f} TFLOP/s", flush=True)

    with torch.device("cuda"):  # initialise on the GPU: a 1.4B model takes minutes on the host
        overrides = {} if args.chunk_size is None else dict(chunk_size=args.chunk_size)
        model = MatMambaLM(MatMambaConfig.from_name(args.preset, **overrides))
    cfg = model.config
    results["chunk_size"] = cfg.chunk_size
    grans = list(cfg.granularities)
    tokens = args.batch * args.seq
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device="cuda")

    def mfu(ms: float, flops_tok: float) -> tuple[float, float]:
        achieved = flops_tok * tokens / (ms / 1e3)
        return achieved / PEAK, achieved / (results["matmul_tflops"] * 1e12)

    rows = []

    # (a) stock mamba-ssm, one standalone model per inner width.
    if not (args.skip_stock or args.joint_only):
        for w in grans:
            # Each model tunes mamba-ssm's kernels for its own calls (docstring); stock runs unpinned.
            clear_autotuning(pins=False)
            expand = cfg.expand * w / cfg.d_model
            stock = stock_lm(cfg.d_model, cfg.n_layer, cfg.vocab_size, expand, cfg.headdim, cfg.chunk_size)

            def train_step(m=stock):
                with torch.autocast(**amp):
                    loss = lm_loss(m, ids)
                loss.backward()

            def infer(m=stock):
                with torch.no_grad(), torch.autocast(**amp):
                    m(ids[:, :-1])

            ms_train = bench(train_step, reps=args.reps)
            ms_inf = bench(infer, reps=args.reps)
            mem = peak_mem(train_step)
            stock.zero_grad(set_to_none=True)
            # The same model with bf16 weights, as it would be deployed: no casts in the forward.
            stock_bf16 = copy.deepcopy(stock).to(torch.bfloat16)
            ms_inf_bf16 = bench(lambda m=stock_bf16: infer(m), reps=args.reps)
            del stock_bf16
            ft = flops_per_token(model, model.widths(w), training=True, seq_len=args.seq)
            rows.append(
                dict(
                    kind="stock",
                    width=w,
                    train_ms=ms_train,
                    infer_ms=ms_inf,
                    infer_bf16_weights_ms=ms_inf_bf16,
                    peak_gib=mem,
                    train_mfu=mfu(ms_train, ft)[0],
                )
            )
            print(
                f"stock  w={w:5d} train {ms_train:8.1f} ms  infer {ms_inf:7.1f} ms  "
                f"(bf16 weights {ms_inf_bf16:7.1f} ms)  peak {mem:5.1f} GiB",
                flush=True,
            )
            del stock
            gc.collect()
            torch.cuda.empty_cache()

    # (b) the nested model at each width, eager and graphed.
    clear_autotuning()
    for w in [] if args.joint_only else grans:

        def train_step(w=w):
            with torch.autocast(**amp):
                loss = lm_loss(model, ids, w)
            loss.backward()

        def infer(w=w):
            with torch.no_grad(), torch.autocast(**amp):
                model(ids[:, :-1], width=w)

        ms_train = bench(train_step, reps=args.reps)
        model.zero_grad(set_to_none=True)
        ms_inf = bench(infer, reps=args.reps)
        mem = peak_mem(train_step)
        model.zero_grad(set_to_none=True)
        row = dict(
            kind="nested",
            width=w,
            train_ms=ms_train,
            infer_ms=ms_inf,
            peak_gib=mem,
            train_mfu=mfu(ms_train, flops_per_token(model, model.widths(w), True, args.seq))[0],
        )
        if not args.skip_graphs:
            try:
                graphed = GraphedForward(model, ids[:, :-1], width=w)
                row["infer_graph_ms"] = bench(lambda g=graphed: g(ids[:, :-1]), reps=args.reps)
                del graphed
                # Serving: the linear weights cast to bf16 once, at capture (frozen_weights).
                graphed = GraphedForward(model, ids[:, :-1], width=w, frozen_weights=True)
                row["infer_graph_frozen_ms"] = bench(lambda g=graphed: g(ids[:, :-1]), reps=args.reps)
                del graphed
            except Exception as err:  # noqa: BLE001 - report, keep benchmarking
                row["infer_graph_error"] = repr(err)[:300]
        rows.append(row)
        print(
            f"nested w={w:5d} train {ms_train:8.1f} ms  infer {ms_inf:7.1f} ms  "
            f"graph {row.get('infer_graph_ms', float('nan')):7.1f} ms  "
            f"frozen {row.get('infer_graph_frozen_ms', float('nan')):7.1f} ms  peak {mem:5.1f} GiB",
            flush=True,
        )
        torch.cuda.empty_cache()

    # (c) the joint step: every granularity forward+backward, clipping, one AdamW step. Eager with
    # autograd's weight gradients, eager with direct (width-proportional) weight gradients as the
    # training module uses on one GPU, and the forward/backward captured as a CUDA graph.
    weights = [1.0 / len(grans)] * len(grans)
    joint_flops = sum(flops_per_token(model, model.widths(w), True, args.seq) for w in grans) * tokens
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    params_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    results["joint"] = dict(params_gib=params_gib, optimizer_state_gib=2 * params_gib)

    def joint_eager(direct: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        losses = []
        for w, wt in zip(grans, weights):
            with torch.autocast(**amp), direct_weight_grads(direct):
                loss = lm_loss(model, ids, w)
            (loss * wt).backward()
            losses.append(loss.detach())
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return losses, norm

    # The first step creates the optimizer state before memory is measured. Its losses and gradient
    # norm, from the seeded initial weights, let two runs (e.g. other kernel configurations) be
    # compared for equal results, not only for time.
    losses, norm = joint_eager(True)
    results["joint"]["first_step"] = dict(losses=[float(x) for x in losses], grad_norm=float(norm))

    def record_joint(name: str, ms: float, mem: float, note: str = "", **extra) -> None:
        row = dict(
            ms=ms, tokens_per_s=tokens / (ms / 1e3), mfu=mfu(ms, joint_flops / tokens)[0], peak_gib=mem
        )
        results["joint"][name] = {**row, **extra}
        print(f"joint {name:15s} {ms:8.1f} ms  MFU {row['mfu']:.1%}  peak {mem:.1f} GiB{note}", flush=True)

    for name, direct in () if args.joint_only else (("eager_autograd", False), ("eager_direct", True)):
        ms = bench(lambda d=direct: joint_eager(d), reps=args.reps)
        record_joint(name, ms, peak_mem(lambda d=direct: joint_eager(d)))
    torch.cuda.empty_cache()
    if not args.skip_graphs:
        try:
            step = GraphedJointStep(model, ids, grans, weights, lm_loss, max_grad_norm=1.0)

            def joint_graph():
                step(ids)
                opt.step()

            ms = bench(joint_graph, reps=args.reps)
            # A replay allocates nothing: its activations live in the graph's private pool, which
            # stays reserved, so the graphed step's memory is what is reserved, not the allocated peak.
            mem = peak_mem(joint_graph)
            torch.cuda.empty_cache()
            reserved = torch.cuda.memory_reserved() / 2**30
            note = f" allocated; reserved with the graph's pool {reserved:.1f} GiB"
            record_joint("graph", ms, mem, note, reserved_gib=reserved)
            del step
        except Exception as err:  # noqa: BLE001
            results["joint"]["graph_error"] = repr(err)[:500]
            print("joint graph failed:", repr(err)[:500], flush=True)

    # Speedup at a width: the faster stock inference (autocast or bf16 weights) over the faster
    # graphed nested one (casting per replay or frozen_weights).
    stock_by_width = {r["width"]: r for r in rows if r["kind"] == "stock"}
    for r in rows:
        graphed = [r[k] for k in ("infer_graph_ms", "infer_graph_frozen_ms") if k in r]
        if r["kind"] == "nested" and r["width"] in stock_by_width and graphed:
            s = stock_by_width[r["width"]]
            r["speedup_vs_stock"] = min(s["infer_ms"], s["infer_bf16_weights_ms"]) / min(graphed)
    results["rows"] = rows
    results["wall_s"] = time.time() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))

    # Summary table last (the device tool returns the end of the output).
    print(
        f"\n== {args.preset} chunk {cfg.chunk_size} batch {args.batch} seq {args.seq} on {results['device']} "
        f"(matmul ceiling {results['matmul_tflops']:.0f} TFLOP/s)"
    )
    # infer ms: eager under autocast; bf16 w: stock with bf16 weights; graph: nested, graphed;
    # frozen: graphed with the weights cast once (frozen_weights); speedup: as above.
    nan = float("nan")
    print(
        f"{'kind':7s} {'width':>6s} {'train ms':>9s} {'infer ms':>9s} {'bf16 w':>8s} {'graph ms':>9s} "
        f"{'frozen':>8s} {'speedup':>8s} {'MFU':>6s} {'GiB':>6s}"
    )
    for r in rows:
        speedup = r.get("speedup_vs_stock", nan)
        print(
            f"{r['kind']:7s} {r['width']:6d} {r['train_ms']:9.1f} {r['infer_ms']:9.1f} "
            f"{r.get('infer_bf16_weights_ms', nan):8.1f} {r.get('infer_graph_ms', nan):9.1f} "
            f"{r.get('infer_graph_frozen_ms', nan):8.1f} {speedup:7.2f}x {r['train_mfu']:6.1%} {r['peak_gib']:6.1f}"
        )
    j = results["joint"]
    stock_sum = sum(r["train_ms"] for r in rows if r["kind"] == "stock")
    full = next((r for r in rows if r["kind"] == "nested" and r["width"] == grans[0]), None)
    for name in ("eager_autograd", "eager_direct", "graph"):
        if name in j:
            ratio = j[name]["ms"] / stock_sum if stock_sum else float("nan")
            print(
                f"joint {name:15s} {j[name]['ms']:8.1f} ms  MFU {j[name]['mfu']:6.1%}  "
                f"/ stock sum {ratio:.2f}  peak {j[name]['peak_gib']:.1f} GiB"
            )
    if full is not None:
        print(
            f"sum of stock fwd+bwd {stock_sum:.1f} ms; largest single width step peak {full['peak_gib']:.1f} GiB "
            f"+ AdamW state {j['optimizer_state_gib']:.1f} GiB = {full['peak_gib'] + j['optimizer_state_gib']:.1f} GiB"
        )


if __name__ == "__main__":
    main()
