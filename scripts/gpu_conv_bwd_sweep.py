"""Time the causal-conv1d backward kernel's variants (`_BWD_VARIANTS`: one-step prefetch into
registers, or 4 steps an iteration pipelined by Triton at 2-4 stages) at several run lengths (`_BWD_CHUNK`, the time steps
one program walks per row), at the channel counts of the LM presets' widths, bf16, B x L = 8 x 1024
(1.4b) and 16 x 1024 (130m). The run length is a runtime argument of the kernel: one compilation per
variant serves every value. Each result (dx, dweight, dbias) is checked against the default variant
at the default run length; the script exits with status 1 if a relative difference exceeds --tol
or a variant fails. The defaults time 4 variants x 4 run lengths x 8 widths. The fifth run's
sweep (10 variants, since cut to the fastest and the old default) finished within its 300 s limit
on one H200, sharing the host with three other jobs; --variants and --chunks narrow it.

    python scripts/gpu_conv_bwd_sweep.py --out $OUT/conv-bwd-sweep.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_kernel_check import rel_err  # noqa: E402  (it loads this checkout's kernels/)

from lit_matmamba import MatMambaConfig  # noqa: E402

PRESETS = {"lm-1.4b": 8, "lm-130m": 16}  # preset: batch
SEQLEN = 1024


def conv_channels(preset: str) -> list[int]:
    """The conv's channels at each granularity: the x prefix plus B and C."""
    cfg = MatMambaConfig.from_name(preset)
    return [cfg.expand * w + 2 * cfg.ngroups * cfg.d_state for w in cfg.granularities]


def main() -> None:
    kernel = importlib.import_module("lit_matmamba.kernels.causal_conv1d.kernel")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, nargs="+", default=[128, 64, 32, 16])
    ap.add_argument(
        "--variants", nargs="+", default=list(kernel._BWD_VARIANTS), choices=list(kernel._BWD_VARIANTS)
    )
    ap.add_argument(
        "--tol", type=float, default=1e-4, help="largest relative difference accepted vs the default"
    )
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "conv-bwd-sweep.json"))
    args = ap.parse_args()

    default_chunk, default_variant = kernel._BWD_CHUNK, kernel._BWD_VARIANT
    rows, failures = [], []
    torch.manual_seed(0)
    warm = True
    for preset, bsz in PRESETS.items():
        for channels in conv_channels(preset):
            x = torch.randn(bsz, SEQLEN, channels, device="cuda", dtype=torch.bfloat16)  # (B, L, C)
            dy = torch.randn_like(x)  # (B, L, C)
            w = torch.randn(channels, 4, device="cuda") * 0.5  # (C, K)
            b = torch.randn(channels, device="cuda")  # (C,)
            dfinal = torch.zeros(bsz, channels, 3, device="cuda", dtype=x.dtype)  # (B, C, K-1)

            def run(x=x, w=w, b=b, dy=dy, dfinal=dfinal):
                return kernel._conv_bwd(x, w, b, None, True, dy, dfinal)

            kernel._BWD_CHUNK, kernel._BWD_VARIANT = default_chunk, default_variant
            ref = run()  # dx (B, L, C), dweight (C, K), dbias (C,), None
            if warm:  # a freshly started GPU times slower at first (BENCHMARKS.md, call 5a)
                triton.testing.do_bench(run, rep=2000)
                warm = False
            for chunk in args.chunks:
                for variant in args.variants:
                    kernel._BWD_CHUNK, kernel._BWD_VARIANT = chunk, variant
                    row = dict(preset=preset, channels=channels, variant=variant, chunk=chunk)
                    try:
                        out = run()
                        row["max_rel_err"] = max(rel_err(o, r) for o, r in zip(out[:3], ref[:3]))
                        row["us"] = triton.testing.do_bench(run) * 1e3
                    except Exception as e:  # a variant that fails to compile or run must not end the sweep
                        row["error"] = f"{type(e).__name__}: {e}"
                        failures.append(row)
                        print(
                            f"{preset:8s} C={channels:5d} {variant:18s} chunk {chunk:4d}: {row['error']}",
                            flush=True,
                        )
                        continue
                    finally:
                        kernel._BWD_CHUNK, kernel._BWD_VARIANT = default_chunk, default_variant
                    rows.append(row)
                    if row["max_rel_err"] > args.tol:
                        failures.append(row)
                    gbs = 3 * x.numel() * x.element_size() / (row["us"] * 1e-6) / 1e9
                    print(
                        f"{preset:8s} C={channels:5d} {variant:18s} chunk {chunk:4d}: {row['us']:7.1f} us "
                        f"({gbs:5.0f} GB/s of x, dy, dx)  max rel diff vs {default_variant}/{default_chunk}: "
                        f"{row['max_rel_err']:.1e}",
                        flush=True,
                    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(dict(device=torch.cuda.get_device_name(), rows=rows, failures=failures), indent=2)
    )
    n_widths = {preset: len(conv_channels(preset)) for preset in PRESETS}
    for preset in PRESETS:
        base = sum(
            r["us"]
            for r in rows
            if (r["preset"], r["variant"], r["chunk"]) == (preset, default_variant, default_chunk)
        )
        print(
            f"{preset}: sum over the widths, in us (and against {default_variant} at chunk {default_chunk})"
        )
        for variant in args.variants:
            for chunk in args.chunks:
                sel = [
                    r["us"]
                    for r in rows
                    if (r["preset"], r["variant"], r["chunk"]) == (preset, variant, chunk)
                ]
                if len(sel) == n_widths[preset]:
                    ratio = f"  x{sum(sel) / base:.3f}" if base else ""
                    print(f"  {variant:18s} chunk {chunk:4d}: {sum(sel):7.1f}{ratio}")
    if failures:
        print(f"{len(failures)} configurations failed or differ from the default by more than {args.tol}:")
        for r in failures:
            print(f"  {r}")
        sys.exit(1)


if __name__ == "__main__":
    main()
