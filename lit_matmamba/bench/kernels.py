"""The GPU check of every op: correctness against its PyTorch reference, then timings.

For each op (causal conv1d, gated RMSNorm, residual add + RMSNorm, SSD scan via mamba-ssm, the LM
loss's cross-entropy) in fp32 and bf16 at realistic sizes: relative errors of outputs and gradients
against the reference run in float64 on the same inputs, then the median time
(`triton.testing.do_bench`) of the forward and of forward + backward of the Triton op, of the
reference in the op's dtype, and of a baseline where one exists: cuDNN's depthwise conv1d (conv),
mamba-ssm's `rmsnorm_fn` (norm), the unfused PyTorch ops (addnorm), `F.cross_entropy` on a float32
copy of the logits (ce).
"""

from __future__ import annotations

import importlib.metadata
import json
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from lit_matmamba.kernels import (
    add_rmsnorm,
    causal_conv1d,
    cross_entropy,
    gated_rmsnorm,
    mamba_ssm_compat,
    ssd_scan,
)

Op = Literal["conv", "norm", "addnorm", "ssd", "ce"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Norm-relative error bounds: the kernels accumulate in fp32, so fp32 results sit at rounding level
# and bf16 ones at their output rounding; mamba-ssm's SSD multiplies in TF32.
TOL = {
    ("conv", "fp32"): 1e-5,
    ("conv", "bf16"): 1e-2,
    ("norm", "fp32"): 1e-5,
    ("norm", "bf16"): 1e-2,
    ("addnorm", "fp32"): 1e-5,
    ("addnorm", "bf16"): 1e-2,
    ("ssd", "fp32"): 1e-2,
    ("ssd", "bf16"): 5e-2,
    ("ce", "fp32"): 1e-5,
    ("ce", "bf16"): 1e-2,
}


def kernels(out: str | None = None, ops: list[Op] | None = None, raise_on_failure: bool = True) -> dict:
    """Check every op's Triton kernel against its PyTorch reference on the GPU, and time both.

    Prints one line per tensor checked and per timing, then a summary; the results also come back
    as a dict (device and versions, "correctness" rows, "timing" rows, "errors" per op).

    Args:
        out: Where to write the results as JSON; nothing is written if None.
        ops: Which ops to check, of conv (causal conv1d at lm-1.4b's conv width), norm (gated
            RMSNorm), addnorm (residual add + RMSNorm), ssd (the SSD scan; skipped without mamba-ssm)
            and ce (the LM loss's cross-entropy at the padded vocabulary); all if None.
        raise_on_failure: Raise AssertionError (after printing and writing the results) when a
            check exceeds its tolerance or an op's section fails.

    Raises:
        ValueError: For an unknown op.
        RuntimeError: Without a CUDA GPU.
    """
    sections = {
        # conv: (B, L, C) with C = 2 * ngroups * d_state + nheads * headdim = 2*128 + 128*64
        "conv": (_conv_section, (2, 2048, 8448), (4, 4096, 8448)),
        # norm: (rows = B*L, d)
        "norm": (_norm_section, (4096, 8192), (16384, 8192)),
        # addnorm: (rows = B*L, d_model) of lm-1.4b batch 8
        "addnorm": (_addnorm_section, (4096, 2048), (8192, 2048)),
        # ssd: (b, l, h, p, g, n); l not a multiple of the chunk size in the check
        "ssd": (_ssd_section, (2, 1000, 32, 64, 1, 128), (4, 4096, 128, 64, 1, 128)),
        # ce: (rows = B*(L-1), padded vocabulary) of lm-1.4b batch 8; the check's vocabulary unpadded
        "ce": (_ce_section, (4096, 50277), (8192, 50288)),
    }
    ops = list(sections) if ops is None else list(ops)
    unknown = sorted(set(ops) - set(sections))
    if unknown:
        raise ValueError(f"unknown ops {unknown}; choose among {list(sections)}")
    if not torch.cuda.is_available():
        raise RuntimeError("the kernel benchmark checks and times Triton kernels on a CUDA GPU; none is here")
    import triton

    try:
        mamba_version = importlib.metadata.version("mamba-ssm")
    except importlib.metadata.PackageNotFoundError:
        mamba_version = None
    report = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        mamba_ssm=mamba_version,
        correctness=[],
        timing=[],
        errors={},
    )
    print(
        f"{report['device']}  torch {torch.__version__}  triton {triton.__version__}  mamba-ssm {mamba_version}"
    )
    for name in ops:
        section, check_shape, time_shape = sections[name]
        print(f"\n== {name}")
        torch.manual_seed(0)
        try:
            section(check_shape, time_shape, report["correctness"], report["timing"])
        except ImportError as e:  # mamba-ssm missing: the SSD path cannot run here
            print(f"  skipped: {e}")
            report["errors"][name] = f"skipped: {e}"
        except Exception:
            traceback.print_exc()
            report["errors"][name] = traceback.format_exc()
        torch.cuda.empty_cache()
    failures = [r for r in report["correctness"] if not r["ok"]]
    crashed = [k for k, v in report["errors"].items() if not v.startswith("skipped")]
    checks = len(report["correctness"])
    print(f"\n{checks - len(failures)}/{checks} checks ok; crashed: {crashed or 'none'}")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=1))
        print(f"wrote {out}")
    if raise_on_failure and (failures or crashed):
        raise AssertionError(
            f"{len(failures)} checks over tolerance; sections that failed: {crashed or 'none'}"
        )
    return report


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_()


def _outputs_and_grads(fn: Callable, inputs: list[torch.Tensor], cotangents: list[torch.Tensor] | None):
    """fn(*inputs) -> tuple of outputs; returns (outputs, grads of sum(out * cotangent) w.r.t. inputs,
    the cotangents)."""
    outs = fn(*inputs)
    if cotangents is None:
        cotangents = [torch.randn_like(o) for o in outs]
    grads = torch.autograd.grad(outs, inputs, [c.to(o.dtype) for c, o in zip(cotangents, outs)])
    return outs, grads, cotangents


def _compare(op, dtype_name, shape, names, fast_fn, ref_fn, inputs, results) -> None:
    """Triton op vs reference in float64 on the same inputs; appends one row per tensor."""
    fast_in = [_leaf(t) for t in inputs]
    outs, grads, cot = _outputs_and_grads(fast_fn, fast_in, None)
    ref_in = [_leaf(t.double()) for t in inputs]
    ref_outs, ref_grads, _ = _outputs_and_grads(ref_fn, ref_in, [c.double() for c in cot])
    tol = TOL[(op, dtype_name)]
    for name, a, b in zip(names, list(outs) + list(grads), list(ref_outs) + list(ref_grads)):
        err = _rel_err(a, b)
        ok = bool(err <= tol and torch.isfinite(a).all())
        results.append(dict(op=op, dtype=dtype_name, shape=shape, tensor=name, rel_err=err, tol=tol, ok=ok))
        print(
            f"  {op:7s} {dtype_name:5s} {name:16s} rel_err {err:9.2e}  (tol {tol:.0e}) {'ok' if ok else 'FAIL'}"
        )


def _bench(fn: Callable) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _time_impls(
    op, dtype_name, shape, impls: dict[str, Callable], inputs, min_bytes: dict[str, int], results
):
    """Median ms of each impl's forward and forward+backward (autograd.grad into all inputs), and the
    bandwidth that the least traffic (`min_bytes`) would take in that time."""
    inputs = [_leaf(t) for t in inputs]
    for impl, fn in impls.items():
        with torch.no_grad():
            fwd_ms = _bench(lambda fn=fn: fn(*inputs))
        outs = fn(*inputs)
        cot = [torch.randn_like(o) for o in outs]
        fwdbwd_ms = _bench(lambda fn=fn, cot=cot: torch.autograd.grad(fn(*inputs), inputs, cot))
        for kind, ms in (("fwd", fwd_ms), ("fwd+bwd", fwdbwd_ms)):
            gbps = min_bytes[kind] / ms / 1e6 if kind in min_bytes else None
            results.append(dict(op=op, dtype=dtype_name, shape=shape, impl=impl, step=kind, ms=ms, gbps=gbps))
            bw = f"{gbps:7.0f} GB/s" if gbps else ""
            print(f"  {op:7s} {dtype_name:5s} {impl:18s} {kind:8s} {ms:9.3f} ms {bw}")


def _conv_section(check_shape, time_shape, correctness, timing) -> None:
    k = 4

    def make(bsz, seqlen, channels, dtype, init):
        x = torch.randn(bsz, seqlen, channels, device="cuda").to(dtype)
        w_param = 0.5 * torch.randn(channels + 64, 1, k, device="cuda")  # fp32 parameter, a prefix is used
        b_param = torch.randn(channels + 64, device="cuda")
        inputs = [x, w_param, b_param]
        if init:
            inputs.append(torch.randn(bsz, channels, k - 1, device="cuda").to(dtype))
        return inputs

    def op(backend, channels):
        def fn(x, w_param, b_param, init=None):
            return causal_conv1d(
                x, w_param[:channels, 0, :], b_param[:channels], init, activation=True, backend=backend
            )

        return fn

    def cudnn(channels, seqlen, dtype):
        """Depthwise conv1d + SiLU on (B, C, L), the layout cuDNN wants."""

        def fn(xt, w_param, b_param):
            w, b = w_param[:channels].to(dtype), b_param[:channels].to(dtype)
            return (F.silu(F.conv1d(xt, w, b, padding=k - 1, groups=channels)[..., :seqlen]),)

        return fn

    for dtype_name, dtype in DTYPES.items():
        for init in (False, True):
            bsz, seqlen, channels = check_shape
            names = ["y", "final_state", "dx", "dweight", "dbias"] + (["dinitial_state"] if init else [])
            _compare(
                "conv",
                dtype_name,
                [bsz, seqlen, channels, k, "init" if init else "no-init"],
                names,
                op("triton", channels),
                op("reference", channels),
                make(bsz, seqlen, channels, dtype, init),
                correctness,
            )
        bsz, seqlen, channels = time_shape
        x, w_param, b_param = make(bsz, seqlen, channels, dtype, False)
        xt = x.transpose(1, 2).contiguous()  # (B, C, L): cuDNN's layout, transposed outside the timing
        size = x.numel() * x.element_size()
        min_bytes = {
            "fwd": 2 * size,
            "fwd+bwd": 5 * size,
        }  # fwd reads x, writes y; bwd reads x, dy, writes dx
        shape = [bsz, seqlen, channels, k]
        impls = {"triton": op("triton", channels), "reference": op("reference", channels)}
        _time_impls("conv", dtype_name, shape, impls, [x, w_param, b_param], min_bytes, timing)
        cudnn_impl = {"cudnn (B,C,L)": cudnn(channels, seqlen, dtype)}
        _time_impls("conv", dtype_name, shape, cudnn_impl, [xt, w_param, b_param], min_bytes, timing)


def _norm_section(check_shape, time_shape, correctness, timing) -> None:
    try:
        mamba_rmsnorm = mamba_ssm_compat.get_rmsnorm_fn()
    except ImportError as e:
        print(f"  (mamba-ssm rmsnorm_fn not timed: {e})")
        mamba_rmsnorm = None

    def op(backend, d, ngroups):
        def fn(x, zxbcdt, w_param):
            z = zxbcdt[..., :d]  # a strided view, as in the mixer
            return (gated_rmsnorm(x, z, w_param[:d], 1e-5, d // ngroups, False, backend=backend),)

        return fn

    def mamba(d, ngroups):
        def fn(x, zxbcdt, w_param):
            z = zxbcdt[..., :d]
            return (
                mamba_rmsnorm(
                    x, w_param[:d], None, z=z, eps=1e-5, group_size=d // ngroups, norm_before_gate=False
                ),
            )

        return fn

    def make(rows, d, dtype):
        x = torch.randn(rows, d, device="cuda").to(dtype)
        zxbcdt = torch.randn(rows, 2 * d + 320, device="cuda").to(dtype)
        w_param = 1 + 0.3 * torch.randn(d + 512, device="cuda")
        return [x, zxbcdt, w_param]

    for dtype_name, dtype in DTYPES.items():
        for ngroups in (1, 8):
            rows, d = check_shape
            _compare(
                "norm",
                dtype_name,
                [rows, d, ngroups],
                ["y", "dx", "dz", "dweight"],
                op("triton", d, ngroups),
                op("reference", d, ngroups),
                make(rows, d, dtype),
                correctness,
            )
            rows, d = time_shape
            inputs = make(rows, d, dtype)
            size = inputs[0].numel() * inputs[0].element_size()
            impls = {"triton": op("triton", d, ngroups), "reference": op("reference", d, ngroups)}
            if mamba_rmsnorm is not None:
                impls["mamba-ssm rmsnorm"] = mamba(d, ngroups)
            # fwd reads x, z, writes y; bwd reads x, z, dy, writes dx, dz
            min_bytes = {"fwd": 3 * size, "fwd+bwd": 8 * size}
            _time_impls("norm", dtype_name, [rows, d, ngroups], impls, inputs, min_bytes, timing)


def _addnorm_section(check_shape, time_shape, correctness, timing) -> None:
    """Residual add + RMSNorm of the residual stack: x (bf16 or fp32), fp32 residual, y in x's dtype;
    against the unfused PyTorch ops (add, nn.RMSNorm's F.rms_norm, cast)."""

    def op(backend):
        def fn(x, residual, weight):
            return add_rmsnorm(x, residual, weight, 1e-5, out_dtype=x.dtype, backend=backend)

        return fn

    def unfused(x, residual, weight):
        res = residual + x.float()
        return F.rms_norm(res, (res.shape[-1],), weight, 1e-5).to(x.dtype), res

    def make(rows, d, dtype):
        x = torch.randn(rows, d, device="cuda").to(dtype)
        residual = torch.randn(rows, d, device="cuda")
        weight = 1 + 0.3 * torch.randn(d, device="cuda")
        return [x, residual, weight]

    for dtype_name, dtype in DTYPES.items():
        rows, d = check_shape
        _compare(
            "addnorm",
            dtype_name,
            [rows, d],
            ["y", "residual_out", "dx", "dresidual", "dweight"],
            op("triton"),
            op("reference"),
            make(rows, d, dtype),
            correctness,
        )
        rows, d = time_shape
        inputs = make(rows, d, dtype)
        xb, rb = inputs[0].numel() * inputs[0].element_size(), inputs[1].numel() * 4
        impls = {"triton": op("triton"), "reference": op("reference"), "unfused torch": unfused}
        # fwd reads x, residual, writes y, residual_out; bwd reads residual_out, dy, dresidual_out,
        # writes dx, dresidual
        min_bytes = {"fwd": 2 * xb + 2 * rb, "fwd+bwd": 5 * xb + 6 * rb}
        _time_impls("addnorm", dtype_name, [rows, d], impls, inputs, min_bytes, timing)


def _ssd_section(check_shape, time_shape, correctness, timing) -> None:
    mamba_ssm_compat.get_mamba_chunk_scan_combined()  # ImportError without mamba-ssm: the section is skipped
    chunk = 256

    def make(bsz, seqlen, nheads, headdim, ngroups, dstate, dtype):
        return [
            torch.randn(bsz, seqlen, nheads, headdim, device="cuda").to(dtype),  # x
            (torch.randn(bsz, seqlen, nheads, device="cuda") - 2.0).to(dtype),  # dt
            -torch.rand(nheads, device="cuda") * 4 - 0.5,  # A
            (torch.randn(bsz, seqlen, ngroups, dstate, device="cuda") / dstate**0.5).to(dtype),  # B
            (torch.randn(bsz, seqlen, ngroups, dstate, device="cuda") / dstate**0.5).to(dtype),  # C
            torch.randn(nheads, device="cuda"),  # D
            torch.randn(nheads, device="cuda") * 0.5,  # dt_bias
            torch.randn(bsz, nheads, headdim, dstate, device="cuda"),  # initial_state
        ]

    def op(backend):
        def fn(x, dt, A, B, C, D, dt_bias, initial_state):
            return ssd_scan(x, dt, A, B, C, chunk, D, dt_bias, True, initial_state, backend=backend)

        return fn

    names = ["y", "final_state", "dx", "ddt", "dA", "dB", "dC", "dD", "ddt_bias", "dinitial_state"]
    for dtype_name, dtype in DTYPES.items():
        inputs = make(*check_shape, dtype)
        _compare(
            "ssd", dtype_name, list(check_shape), names, op("triton"), op("reference"), inputs, correctness
        )
        impls = {"triton (mamba-ssm)": op("triton"), "reference": op("reference")}
        _time_impls("ssd", dtype_name, list(time_shape), impls, make(*time_shape, dtype), {}, timing)


def _ce_section(check_shape, time_shape, correctness, timing) -> None:
    """Mean cross-entropy of (rows, vocab) logits as the LM loss takes it (bf16 under autocast),
    against torch's on a float32 copy of the logits. The check has rows with ignore_index and a
    vocabulary that is not a multiple of 16 (unaligned rows); the gradient of the loss is random
    (grad_output != 1)."""

    def make(rows, vocab, dtype, ignored):
        logits = (3 * torch.randn(rows, vocab, device="cuda")).to(dtype)
        target = torch.randint(0, vocab, (rows,), device="cuda")
        if ignored:
            target[::ignored] = -100
        return logits, target

    def op(backend, target):
        def fn(logits):
            return (cross_entropy(logits, target, backend=backend),)

        return fn

    def torch_fp32(target):
        def fn(logits):
            return (F.cross_entropy(logits.float(), target),)

        return fn

    for dtype_name, dtype in DTYPES.items():
        rows, vocab = check_shape
        logits, target = make(rows, vocab, dtype, ignored=7)
        _compare(
            "ce",
            dtype_name,
            [rows, vocab, "ignore 1/7"],
            ["loss", "dlogits"],
            op("triton", target),
            op("reference", target),
            [logits],
            correctness,
        )
        del logits
        rows, vocab = time_shape
        logits, target = make(rows, vocab, dtype, ignored=0)
        size = logits.numel() * logits.element_size()
        impls = {"triton": op("triton", target), "torch fp32 copy": torch_fp32(target)}
        # fwd reads the logits; bwd reads them again and writes the gradient
        _time_impls(
            "ce", dtype_name, [rows, vocab], impls, [logits], {"fwd": size, "fwd+bwd": 3 * size}, timing
        )
        del logits
