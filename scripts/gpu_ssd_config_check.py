"""Which of mamba-ssm's autotune configurations, if any, makes the fused mixer core wrong on this GPU.

The fused core (`kernels/ssd/fused.py`) runs mamba-ssm's autotuned SSD kernels. The test
`tests/test_ssd_fused.py` runs each of them with whatever config the autotuner picks, which can
change from run to run. Here, at the test's shapes and tolerances (float32), the core is compared
with the float64 reference:

1. after re-running the autotuner several times (`--rounds`);
2. with each configuration of each autotuned kernel it runs forced in turn, the other kernels
   keeping the autotuner's choice.

    python scripts/gpu_ssd_config_check.py --out $OUT/ssd-configs.json
    python scripts/gpu_ssd_config_check.py --rounds 1 --shape 1,16,2,8,1,16,16   # one shape: faster
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from kernel_testing import leaf  # noqa: E402
from test_ssd_fused import SHAPES, TOL, core_inputs, errors_against_reference, over_tolerance  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402

from lit_matmamba.kernels import mamba_ssm_compat  # noqa: E402
from lit_matmamba.kernels.ssd import fused  # noqa: E402


def errors(shape, norm_before_gate: bool) -> dict[str, float]:
    """Relative error of the output and of every input gradient, fused core vs float64 reference."""
    bsz, seqlen, k, P, G, N, chunk = shape
    inputs = [leaf(t) for t in core_inputs(bsz, seqlen, k, P, G, N, torch.float32)]
    y = fused.ssd_gated_rmsnorm_triton(*inputs, G, chunk, 1e-5, norm_before_gate)
    return errors_against_reference(inputs, y, G, chunk, norm_before_gate)[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="times the autotuner is re-run from scratch")
    ap.add_argument(
        "--shape",
        action="append",
        metavar="B,L,H,P,G,N,CHUNK",
        help="check only this shape (repeatable; default: every shape of tests/test_ssd_fused.py)",
    )
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "ssd-configs.json"))
    args = ap.parse_args()
    try:
        shapes = [tuple(int(v) for v in s.split(",")) for s in args.shape] if args.shape else SHAPES
    except ValueError:
        ap.error("--shape takes 7 integers separated by commas, e.g. 1,16,2,8,1,16,16")
    if any(len(s) != 7 for s in shapes):
        ap.error("--shape takes 7 integers: batch, length, heads, headdim, groups, d_state, chunk")
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU: on the CPU the autotuner cannot time configurations")
    os.environ["LIT_MATMAMBA_POISON"] = "1"  # unwritten gradient elements show up as NaN
    t0 = time.time()
    internals = mamba_ssm_compat.get_ssd_internals()
    modules = {fn.__module__ for fn in vars(internals).values()}
    tuners = {
        f"{mod.rsplit('.', 1)[-1]}.{name}": obj
        for mod in sorted(modules)
        for name, obj in vars(sys.modules[mod]).items()
        if isinstance(obj, Autotuner)
    }
    cases = [(shape, nbg) for shape in shapes for nbg in (False, True)]
    report: dict = {"device": torch.cuda.get_device_name(), "tolerances": TOL[torch.float32], "failures": []}

    def check(label: str) -> None:
        for shape, nbg in cases:
            errs = errors(shape, nbg)
            bad = {n: e for n, (e, _) in over_tolerance(errs, torch.float32).items()}
            if bad:
                failure = dict(run=label, shape=shape, norm_before_gate=nbg, errors=errs, too_large=bad)
                report["failures"].append(failure)
                print("FAIL", json.dumps(failure), flush=True)

    for r in range(args.rounds):
        for tuner in tuners.values():
            tuner.cache.clear()
        check(f"autotuned, round {r}")
        print(f"[{time.time() - t0:6.1f} s] autotune round {r} done", flush=True)
    # Only the kernels the core ran have a cached choice; forcing the others' configs changes nothing.
    used = {name: tuner for name, tuner in tuners.items() if tuner.cache}
    report["configs_checked"] = {}
    for name, tuner in used.items():
        configs = tuner.configs
        try:
            for i, config in enumerate(configs):
                tuner.configs = [config]  # one config: the autotuner runs it without timing
                try:
                    check(f"{name} config {i}: {config}")
                except OutOfResources as err:  # the autotuner prunes these too: not a result
                    report.setdefault("configs_not_fitting", []).append(f"{name} config {i}: {err}")
                    print(f"skipped {name} config {i} (does not fit: {err})", flush=True)
        finally:
            tuner.configs = configs
            tuner.cache.clear()
        report["configs_checked"][name] = len(configs)
        print(f"[{time.time() - t0:6.1f} s] {name}: {len(configs)} configs", flush=True)
    report["wall_s"] = time.time() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print(
        f"{len(report['failures'])} failing runs over {args.rounds} autotune rounds and "
        f"{sum(report['configs_checked'].values())} forced configs x {len(cases)} cases"
    )


if __name__ == "__main__":
    main()
