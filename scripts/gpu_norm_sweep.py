"""Time the gated RMSNorm kernels' tile sizes (`kernels/gated_rmsnorm/kernel.py`, `_FWD_TILE` and
`_BWD_TILE`, in elements) as the fused mixer core calls them: bf16, y (B*L, kP) contiguous, z a
(B*L, k, P) view of the (B, L, k, P + 1) in_proj output, dz written into the same view of its
gradient, at every width of the LM presets (B x L = 8 x 1024 for 1.4b, 16 x 1024 for 130m). "1,1" is
one row a tile, as the kernels were before tiling. Each result (y, rstd; dx, dz, dweight) is
checked against the default tiles; the script exits with status 1 if a relative difference exceeds
--tol or a setting fails.

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


def parse_tiles(spec: str) -> tuple[int, int]:
    fwd, bwd = (int(v) for v in spec.split(","))
    return fwd, bwd


def main() -> None:
    kernel = importlib.import_module("lit_matmamba.kernels.gated_rmsnorm.kernel")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--tiles",
        nargs="+",
        type=parse_tiles,
        default=[(1, 1), (1024, 2048), (2048, 4096), (2048, 8192), (4096, 4096)],
        help='"fwd,bwd" tile sizes in elements',
    )
    ap.add_argument(
        "--tol", type=float, default=1e-4, help="largest relative difference accepted vs the default"
    )
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "norm-sweep.json"))
    args = ap.parse_args()
    if "LIT_MATMAMBA_NORM_TILES" in os.environ:
        sys.exit("unset LIT_MATMAMBA_NORM_TILES: the sweep sets the tiles itself")

    default = (kernel._FWD_TILE, kernel._BWD_TILE)
    rows, failures = [], []
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
            dzdt = torch.empty_like(zdt)
            dout = torch.randn_like(y)  # (M, kP)
            w = 1 + 0.3 * torch.randn(d, device="cuda")  # (kP,)
            z, dz = zdt[..., :P], dzdt[..., :P]  # (M, k, P) views
            eps = cfg.norm_eps

            def fwd(y=y, z=z, w=w, d=d, eps=eps):
                return kernel._norm_fwd(y, z, w, eps, d, True, False)

            def bwd(rstd, y=y, z=z, w=w, d=d, dout=dout, dz=dz):
                dx, _, dw = kernel._norm_bwd(y, z, w, rstd, dout, d, True, False, True, dz=dz)
                return dx, dz.clone(), dw

            kernel._FWD_TILE, kernel._BWD_TILE = default
            ref_fwd = fwd()
            ref_bwd = bwd(ref_fwd[1])
            if warm:  # a freshly started GPU times slower at first (BENCHMARKS.md, call 5a)
                triton.testing.do_bench(fwd, rep=2000)
                warm = False
            for tiles in args.tiles:
                kernel._FWD_TILE, kernel._BWD_TILE = tiles
                row = dict(preset=preset, width=width, channels=d, fwd_tile=tiles[0], bwd_tile=tiles[1])
                try:
                    out_fwd = fwd()
                    out_bwd = bwd(out_fwd[1])
                    row["max_rel_err"] = max(
                        rel_err(o, r) for o, r in zip((*out_fwd, *out_bwd), (*ref_fwd, *ref_bwd))
                    )
                    row["fwd_us"] = triton.testing.do_bench(fwd) * 1e3
                    row["bwd_us"] = triton.testing.do_bench(lambda b=bwd, r=ref_fwd[1]: b(r)) * 1e3
                except Exception as e:  # a setting that fails to compile or run must not end the sweep
                    row["error"] = f"{type(e).__name__}: {e}"
                    failures.append(row)
                    print(f"{preset:8s} d={d:5d} tiles {tiles}: {row['error']}", flush=True)
                    continue
                finally:
                    kernel._FWD_TILE, kernel._BWD_TILE = default
                rows.append(row)
                if row["max_rel_err"] > args.tol:
                    failures.append(row)
                nbytes = y.numel() * y.element_size()
                # Bytes the kernels must move: forward y, z in and out; backward y, z, dout in, dx, dz out.
                print(
                    f"{preset:8s} d={d:5d} tiles {tiles[0]:5d},{tiles[1]:5d}: fwd {row['fwd_us']:7.1f} us "
                    f"({3 * nbytes / row['fwd_us'] / 1e3:5.0f} GB/s), bwd {row['bwd_us']:7.1f} us "
                    f"({5 * nbytes / row['bwd_us'] / 1e3:5.0f} GB/s), max rel diff vs default "
                    f"{row['max_rel_err']:.1e}",
                    flush=True,
                )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            dict(device=torch.cuda.get_device_name(), default=default, rows=rows, failures=failures), indent=2
        )
    )
    for preset in PRESETS:
        print(f"{preset}: sum over the widths, forward + backward, us")
        for tiles in args.tiles:
            sel = [r for r in rows if r["preset"] == preset and (r["fwd_tile"], r["bwd_tile"]) == tiles]
            if sel:
                fwd_sum, bwd_sum = sum(r["fwd_us"] for r in sel), sum(r["bwd_us"] for r in sel)
                print(f"  tiles {tiles[0]:5d},{tiles[1]:5d}: fwd {fwd_sum:7.1f}  bwd {bwd_sum:7.1f}")
    if failures:
        print(f"{len(failures)} failures: {failures}")
        sys.exit(1)


if __name__ == "__main__":
    main()
