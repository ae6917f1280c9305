"""Time the causal-conv1d backward kernel at several run lengths (`_BWD_CHUNK`, the time steps one
program walks per row) at the channel counts of the LM presets' widths, bf16, B x L = 8 x 1024
(1.4b) and 16 x 1024 (130m). The run length is a runtime argument of the kernel: one compilation
serves every value. Each result is checked against the kernel's default run length's.

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


def conv_channels(preset: str) -> list[int]:
    """The conv's channels at each granularity: the x prefix plus B and C."""
    cfg = MatMambaConfig.from_name(preset)
    return [cfg.expand * w + 2 * cfg.ngroups * cfg.d_state for w in cfg.granularities]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, nargs="+", default=[128, 64, 32, 16])
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "conv-bwd-sweep.json"))
    args = ap.parse_args()
    kernel = importlib.import_module("lit_matmamba.kernels.causal_conv1d.kernel")

    default = kernel._BWD_CHUNK
    rows = []
    torch.manual_seed(0)
    for preset, bsz in PRESETS.items():
        for channels in conv_channels(preset):
            x = torch.randn(bsz, 1024, channels, device="cuda", dtype=torch.bfloat16)
            dy = torch.randn_like(x)
            w = torch.randn(channels, 4, device="cuda") * 0.5
            b = torch.randn(channels, device="cuda")
            dfinal = torch.zeros(bsz, channels, 3, device="cuda", dtype=x.dtype)

            def run(x=x, w=w, b=b, dy=dy, dfinal=dfinal):
                return kernel._conv_bwd(x, w, b, None, True, dy, dfinal)

            kernel._BWD_CHUNK = default
            ref = run()
            for chunk in args.chunks:
                kernel._BWD_CHUNK = chunk
                out = run()
                errs = [rel_err(o, r) for o, r in zip(out[:3], ref[:3])]
                ms = triton.testing.do_bench(run)
                rows.append(
                    dict(preset=preset, channels=channels, chunk=chunk, us=ms * 1e3, max_rel_err=max(errs))
                )
                gbs = 3 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9
                print(
                    f"{preset:8s} C={channels:5d} chunk {chunk:4d}: {ms * 1e3:7.1f} us "
                    f"({gbs:5.0f} GB/s of x, dy, dx)  max rel err vs {default}: {max(errs):.1e}",
                    flush=True,
                )
    kernel._BWD_CHUNK = default
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), rows=rows), indent=2))
    for preset in PRESETS:
        for chunk in args.chunks:
            total = sum(r["us"] for r in rows if r["preset"] == preset and r["chunk"] == chunk)
            print(f"{preset} chunk {chunk}: sum over the widths {total:.1f} us")


if __name__ == "__main__":
    main()
