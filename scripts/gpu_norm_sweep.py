"""Time the gated RMSNorm kernels (`kernels/gated_rmsnorm/kernel.py`) as the fused mixer core calls
them: bf16, y (B*L, kP) contiguous, z a (B*L, k, P) view of the (B, L, k, P + 1) in_proj output, dz
written into the same view of its gradient, at every width of the LM presets (B x L = 8 x 1024 for
1.4b, 16 x 1024 for 130m). Then the column sums of the norms' partial weight gradients:
`partial_sums.sum_rows` against `parts.sum(0)` at the shapes a joint step sums; the script exits with
status 1 if their relative difference from a float64 sum exceeds 1e-6.

The sixth run's call 2 ran this script with the backward's variants then in the kernel (Triton
pipelining a row's loads 1 or 2 rows ahead, and more programs an SM for narrow rows), checked
against the kernel as it is; none was faster in the joint step (BENCHMARKS.md), and they were removed.

    python scripts/gpu_norm_sweep.py --out $OUT/norm-sweep.json
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


def main() -> None:
    kernel = importlib.import_module("lit_matmamba.kernels.gated_rmsnorm.kernel")
    add_kernel = importlib.import_module("lit_matmamba.kernels.add_rmsnorm.kernel")
    partial_sums = importlib.import_module("lit_matmamba.kernels.partial_sums")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "norm-sweep.json"))
    args = ap.parse_args()
    rows, sums, failures = [], [], []

    def time_sums(preset: str, name: str, shape: tuple[int, int]) -> None:
        """`partial_sums.sum_rows` against `parts.sum(0)` on random float32 partial sums."""
        parts = torch.randn(*shape, device="cuda")
        entry = dict(preset=preset, op=name, shape=list(parts.shape))
        entry["rel_err"] = rel_err(partial_sums.sum_rows(parts), parts.double().sum(0))
        entry["torch_us"] = triton.testing.do_bench(lambda: parts.sum(0)) * 1e3
        entry["sum_rows_us"] = triton.testing.do_bench(lambda: partial_sums.sum_rows(parts)) * 1e3
        sums.append(entry)
        if entry["rel_err"] > 1e-6:
            failures.append(entry)
        print(
            f"{preset:8s} {name:13s} partial sums {shape}: torch {entry['torch_us']:5.1f} us, "
            f"sum_rows {entry['sum_rows_us']:5.1f} us, rel err {entry['rel_err']:.1e}"
        )

    torch.manual_seed(0)
    warm = True
    for preset, bsz in PRESETS.items():
        cfg = MatMambaConfig.from_name(preset)
        P = cfg.headdim
        for width in cfg.granularities:
            k = cfg.heads_at(width)
            m, d = bsz * SEQLEN, k * P
            y = torch.randn(m, d, device="cuda", dtype=torch.bfloat16)  # (M, kP): the scan's output
            zdt = torch.randn(m, k, P + 1, device="cuda", dtype=torch.bfloat16)  # (M, k, P + 1)
            dzdt = torch.zeros_like(zdt)
            dout = torch.randn_like(y)  # (M, kP)
            w = 1 + 0.3 * torch.randn(d, device="cuda")  # (kP,)
            z, dz = zdt[..., :P], dzdt[..., :P]  # (M, k, P) views
            eps = cfg.norm_eps

            def fwd(y=y, z=z, w=w, d=d, eps=eps):
                return kernel._norm_fwd(y, z, w, eps, d, True, False)

            rstd = fwd()[1]  # (1, M)

            def bwd(y=y, z=z, w=w, d=d, dout=dout, dz=dz, rstd=rstd):
                dx, _, dw = kernel._norm_bwd(y, z, w, rstd, dout, d, True, False, True, dz=dz)
                return dx, dw

            if warm:  # a freshly started GPU times slower at first (BENCHMARKS.md, call 5a)
                triton.testing.do_bench(fwd, rep=2000)
                warm = False
            row = dict(preset=preset, width=width, channels=d)
            row["fwd_us"] = triton.testing.do_bench(fwd) * 1e3
            row["bwd_us"] = triton.testing.do_bench(bwd) * 1e3
            rows.append(row)
            nbytes = y.numel() * y.element_size()
            # Bytes the kernels must move: forward y, z in, out; backward y, z, dout in, dx, dz out.
            print(
                f"{preset:8s} d={d:5d}: forward {row['fwd_us']:7.1f} us ({3 * nbytes / row['fwd_us'] / 1e3:5.0f} GB/s), "
                f"backward {row['bwd_us']:7.1f} us ({5 * nbytes / row['bwd_us'] / 1e3:5.0f} GB/s)",
                flush=True,
            )
            # The gated norm's partial weight gradients: (programs, channels) float32.
            time_sums(preset, "gated norm", (kernel._backward_programs(m, 1, y.device), d))
        # add + RMSNorm's: (programs, d_model) float32 (float32 residual stream), the same at every width.
        block_n = add_kernel._block_n(cfg.d_model, torch.float32)
        programs = add_kernel._backward_programs(m, block_n, y.device)[2]
        time_sums(preset, "add + RMSNorm", (programs, cfg.d_model))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            dict(device=torch.cuda.get_device_name(), rows=rows, partial_sums=sums, failures=failures),
            indent=2,
        )
    )
    if failures:
        print(f"{len(failures)} failures: {failures}")
        sys.exit(1)


if __name__ == "__main__":
    main()
