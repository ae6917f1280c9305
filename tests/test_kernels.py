"""The Triton kernels against the PyTorch references: outputs and gradients.

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py),
so shapes stay tiny; with CUDA the same tests run on the GPU, and the
`gpu`-marked ones add realistic sizes and mamba-ssm's SSD scan. The oracle is the reference run in
float64 on the same (rounded) inputs, so bf16 results may differ from it by their output rounding.
Outputs of the kernels are allocated NaN-filled (LIT_MATMAMBA_POISON=1), so an element a kernel
forgets to write fails the comparison.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from kernel_testing import (
    DEVICE,
    DTYPE_NAMES,
    as_float64,
    assert_close,
    leaf,
    needs_cuda,
    rel_err,
    requires_triton,
)

from lit_matmamba.kernels import causal_conv1d, gated_rmsnorm, ssd_scan
from lit_matmamba.kernels import mamba_ssm_compat as compat

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setenv("LIT_MATMAMBA_POISON", "1")


# ---------------------------------------------------------------------------------------------------
# causal conv1d


def conv_case(bsz, seqlen, channels, k, bias=True, init=True, act=True, dtype=torch.float32, fp32_weights=False,
              x_view=False):  # fmt: skip
    name = f"B{bsz}-L{seqlen}-C{channels}-K{k}{'-bias' if bias else ''}{'-init' if init else ''}"
    name += f"{'-silu' if act else '-linear'}-{DTYPE_NAMES[dtype]}"
    name += f"{'-fp32weights' if fp32_weights else ''}{'-xview' if x_view else ''}"
    extra = dict(weight_dtype=torch.float32 if fp32_weights else None, x_view=x_view)
    return pytest.param(bsz, seqlen, channels, k, bias, init, act, dtype, extra, id=name)


def run_conv(bsz, seqlen, channels, k, bias, init, act, dtype, weight_dtype=None, x_view=False):
    """Inputs as the mixer passes them: weight and bias prefix views of larger parameters, optionally x
    a channel slice of a wider tensor. Returns the leaves, their gradients' names, and the op on them."""
    weight_dtype = weight_dtype or dtype
    c_full = channels + 6
    x_full = torch.randn(bsz, seqlen, c_full if x_view else channels, device=DEVICE).to(dtype)
    w_param = (0.5 * torch.randn(c_full, 1, k, device=DEVICE)).to(weight_dtype)
    b_param = torch.randn(c_full, device=DEVICE).to(weight_dtype) if bias else None
    state = torch.randn(bsz, channels, k - 1, device=DEVICE).to(dtype) if init else None
    named = {"dx": x_full, "dweight": w_param, "dbias": b_param, "dinitial_state": state}
    named = {name: t for name, t in named.items() if t is not None}

    def op(x_full, w_param, *rest, backend):
        rest = list(rest)
        b = rest.pop(0)[:channels] if bias else None
        s = rest.pop(0) if init else None
        return causal_conv1d(x_full[..., :channels], w_param[:channels, 0, :], b, s, act, backend=backend)

    return list(named.values()), list(named), op


@requires_triton
@pytest.mark.parametrize(
    "bsz, seqlen, channels, k, bias, init, act, dtype, extra",
    [
        conv_case(2, 37, 13, 4),
        conv_case(1, 37, 13, 4, dtype=torch.bfloat16),
        conv_case(2, 37, 13, 4, dtype=torch.float16),
        conv_case(2, 21, 13, 4, dtype=torch.bfloat16, fp32_weights=True),  # as under autocast
        conv_case(2, 5, 7, 2, bias=False, init=False, act=False),
        conv_case(1, 2, 9, 4),  # L < K-1: final_state reaches into initial_state
        conv_case(2, 3, 5, 3, bias=False, dtype=torch.bfloat16),
        conv_case(1, 150, 13, 3, init=False),  # several tiles and time runs per program
        conv_case(2, 150, 11, 4, bias=False),  # the same with initial_state
        # Three backward time programs (512 steps each: 8 runs of 64), the last one nearly empty;
        # final_state's times straddle the boundary before it.
        conv_case(1, 1026, 13, 4, init=False),
        conv_case(1, 1030, 11, 4, dtype=torch.bfloat16),
        conv_case(1, 20, 131, 4, init=False, dtype=torch.bfloat16),  # several channel blocks
        conv_case(2, 19, 13, 4, x_view=True),  # x a channel slice of a wider tensor
    ],
)
def test_causal_conv1d_matches_reference(bsz, seqlen, channels, k, bias, init, act, dtype, extra):
    check_conv(bsz, seqlen, channels, k, bias, init, act, dtype, extra)


def check_conv(bsz, seqlen, channels, k, bias, init, act, dtype, extra):
    """Outputs and gradients of the Triton conv against the reference in float64."""
    leaves, names, op = run_conv(bsz, seqlen, channels, k, bias, init, act, dtype, **extra)
    leaves = [leaf(t) for t in leaves]
    y, final = op(*leaves, backend="triton")
    assert y.dtype == dtype and final.dtype == dtype
    dy, dfinal = torch.randn_like(y), torch.randn_like(final)
    grads = torch.autograd.grad([y, final], leaves, [dy, dfinal])

    ref_leaves = as_float64(leaves)
    y_ref, final_ref = op(*ref_leaves, backend="reference")
    ref_grads = torch.autograd.grad([y_ref, final_ref], ref_leaves, [dy.double(), dfinal.double()])

    assert_close(y, y_ref, dtype, "y")
    assert_close(final, final_ref, dtype, "final_state")
    for name, g, g_ref, t in zip(names, grads, ref_grads, leaves):
        assert g.dtype == t.dtype, name
        assert_close(g, g_ref, dtype, name)
    # Only the prefix the op used gets a gradient (zeros beyond it, like the reference).
    assert grads[1][channels:].abs().max() == 0


def conv_bwd_variants() -> list[str]:
    """The backward variants other than the default (kernel._BWD_VARIANTS); none without Triton."""
    if importlib.util.find_spec("triton") is None:
        return []
    kernel = importlib.import_module("lit_matmamba.kernels.causal_conv1d.kernel")
    return [name for name in kernel._BWD_VARIANTS if name != kernel._BWD_VARIANT]


@requires_triton
@pytest.mark.parametrize("variant", conv_bwd_variants())
@pytest.mark.parametrize(
    "bsz, seqlen, channels, k, bias, init, act, dtype, extra",
    [
        # Runs of 6 steps (CH + K-1 = 9: the 4-step unrolled loop ends mid-iteration): several time
        # programs, the last one partial, final_state's times past the last full program.
        conv_case(1, 100, 13, 4),
        # K = 3 and, with 8 rows, CH + K-1 = 8: whole unrolled iterations; two channel blocks, one partial.
        conv_case(2, 50, 70, 3, bias=False, init=False, act=False, dtype=torch.bfloat16),
    ],
)
def test_causal_conv1d_bwd_variants_match_reference(monkeypatch, variant, bsz, seqlen, channels, k, bias, init,
                                                    act, dtype, extra):  # fmt: skip
    kernel = importlib.import_module("lit_matmamba.kernels.causal_conv1d.kernel")
    monkeypatch.delenv("LIT_MATMAMBA_CONV_BWD", raising=False)  # it would override the variant
    monkeypatch.setattr(kernel, "_BWD_VARIANT", variant)
    monkeypatch.setattr(kernel, "_BWD_CHUNK", 6)  # short runs: tiny sequences span several programs
    check_conv(bsz, seqlen, channels, k, bias, init, act, dtype, extra)


@requires_triton
def test_causal_conv1d_bwd_variant_from_the_environment(monkeypatch):
    """LIT_MATMAMBA_CONV_BWD picks the variant (benchmarks' A/B); an unknown name is a clear error."""
    kernel = importlib.import_module("lit_matmamba.kernels.causal_conv1d.kernel")
    launched = []
    real = kernel._conv_bwd_kernel

    class Spy:  # records the variant's constexprs, then launches the real kernel
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append((kwargs["UNROLL"], kwargs["STAGES"]))
                return real[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(kernel, "_conv_bwd_kernel", Spy())
    monkeypatch.setenv("LIT_MATMAMBA_CONV_BWD", "prefetch1")
    check_conv(1, 20, 5, 4, True, False, True, torch.float32, {})
    assert launched == [(1, None)]
    monkeypatch.setenv("LIT_MATMAMBA_CONV_BWD", "no-such-variant")
    with pytest.raises(ValueError, match="LIT_MATMAMBA_CONV_BWD='no-such-variant': not one of"):
        check_conv(1, 20, 5, 4, True, False, True, torch.float32, {})


@requires_triton
def test_causal_conv1d_final_state_continues_the_sequence():
    """Two calls chained through final_state equal one call on the whole sequence."""
    x = torch.randn(2, 23, 10, device=DEVICE)
    weight, bias = torch.randn(10, 4, device=DEVICE), torch.randn(10, device=DEVICE)
    state = torch.randn(2, 10, 3, device=DEVICE)
    y, final = causal_conv1d(x, weight, bias, state, backend="triton")
    y1, mid = causal_conv1d(x[:, :9], weight, bias, state, backend="triton")
    y2, final2 = causal_conv1d(x[:, 9:], weight, bias, mid, backend="triton")
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(final2, final)


# ---------------------------------------------------------------------------------------------------
# column sums of partial sums (the norms' weight gradients)


@requires_triton
@pytest.mark.parametrize(
    "rows, cols, dtype",
    [(1, 5, torch.float32), (300, 70, torch.float32), (528, 192, torch.float64), (7, 33, torch.float32)],
    ids=["one-row", "3-row-tiles-3-strips", "fp64", "a-strip-of-one-column"],
)
def test_sum_rows_matches_torch(rows, cols, dtype):
    """(128, 32) tiles: several row tiles and column strips, the last ones partial; a row view."""
    from lit_matmamba.kernels.partial_sums import sum_rows

    base = torch.randn(rows, cols + 3, device=DEVICE, dtype=dtype)
    parts = base[:, :cols]  # rows strided by cols + 3
    out = sum_rows(parts)
    assert out.dtype == dtype and out.shape == (cols,)
    tol = dict(rtol=1e-6, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, parts.sum(0), **tol)


@requires_triton
def test_sum_rows_rejects_what_it_cannot_read():
    from lit_matmamba.kernels.partial_sums import sum_rows

    with pytest.raises(ValueError, match="unit column stride"):
        sum_rows(torch.randn(4, 6, device=DEVICE).t())
    with pytest.raises(ValueError, match="float32/float64"):
        sum_rows(torch.randn(4, 6, device=DEVICE).to(torch.bfloat16))


# ---------------------------------------------------------------------------------------------------
# gated RMSNorm


def norm_case(bsz, seqlen, d, ngroups, z="view", norm_before_gate=False, dtype=torch.float32):
    name = f"B{bsz}-L{seqlen}-d{d}-G{ngroups}-z{z}{'-norm-before-gate' if norm_before_gate else ''}"
    name += f"-{DTYPE_NAMES[dtype]}"
    return pytest.param(bsz, seqlen, d, ngroups, z, norm_before_gate, dtype, id=name)


@requires_triton
@pytest.mark.parametrize(
    "bsz, seqlen, d, ngroups, z_kind, norm_before_gate, dtype",
    [
        norm_case(2, 5, 24, 3),
        norm_case(2, 5, 24, 1, norm_before_gate=True),
        norm_case(1, 3, 20, 1, z="none"),
        norm_case(2, 5, 24, 2, dtype=torch.bfloat16),  # group of 12: a masked block
        norm_case(2, 5, 24, 2, z="transposed", norm_before_gate=True, dtype=torch.bfloat16),
        norm_case(1, 7, 40, 5, z="transposed"),
        norm_case(2, 9, 16, 2, z="none", dtype=torch.float16),
        # 4 backward programs at most on CPU, split among the groups: each walks many rows.
        norm_case(2, 75, 24, 1, dtype=torch.bfloat16),  # 4 programs of 38 rows, the last 36
        norm_case(2, 25, 2000, 1, dtype=torch.bfloat16),  # a group padded to 2048; 4 programs of 13 rows
        norm_case(3, 50, 48, 2, z="transposed", norm_before_gate=True),  # 2 groups, 2 programs each
    ],
)
def test_gated_rmsnorm_matches_reference(bsz, seqlen, d, ngroups, z_kind, norm_before_gate, dtype):
    check_norm(bsz, seqlen, d, ngroups, z_kind, norm_before_gate, dtype)


def check_norm(bsz, seqlen, d, ngroups, z_kind, norm_before_gate, dtype):
    """x contiguous; z a slice of a wider projection output ("view": rows strided) or a transposed
    tensor ("transposed": rows not mergeable, so the launcher copies); weight a prefix view."""
    x = torch.randn(bsz, seqlen, d, device=DEVICE).to(dtype)
    w_param = (1 + 0.3 * torch.randn(d + 8, device=DEVICE)).to(dtype)
    z_base = {
        "view": torch.randn(bsz, seqlen, 2 * d + 3, device=DEVICE).to(dtype),
        "transposed": torch.randn(seqlen, bsz, d, device=DEVICE).to(dtype),
        "none": None,
    }[z_kind]
    leaves = [leaf(t) for t in (x, w_param, z_base) if t is not None]

    def op(x, w_param, *z_base, backend):
        z = None
        if z_kind == "view":
            z = z_base[0][..., d + 3 :]
        elif z_kind == "transposed":
            z = z_base[0].transpose(0, 1)
        return gated_rmsnorm(x, z, w_param[:d], 1e-5, d // ngroups, norm_before_gate, backend=backend)

    y = op(*leaves, backend="triton")
    assert y.dtype == dtype
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, dy)
    ref_leaves = as_float64(leaves)
    y_ref = op(*ref_leaves, backend="reference")
    ref_grads = torch.autograd.grad(y_ref, ref_leaves, dy.double())

    assert_close(y, y_ref, dtype, "y")
    for name, g, g_ref, t in zip(["dx", "dweight", "dz"], grads, ref_grads, leaves):
        assert g.dtype == t.dtype, name
        assert_close(g, g_ref, dtype, name)
    assert grads[1][d:].abs().max() == 0


# ---------------------------------------------------------------------------------------------------
# mamba-ssm compat shim (CPU: a fake mamba_ssm package)


@pytest.fixture
def no_mamba_ssm(monkeypatch):
    """Hide any imported mamba_ssm modules for the test and drop the ones it imports afterwards."""
    for name in [m for m in sys.modules if m == "mamba_ssm" or m.startswith("mamba_ssm.")]:
        monkeypatch.delitem(sys.modules, name)
    yield
    for name in [m for m in sys.modules if m == "mamba_ssm" or m.startswith("mamba_ssm.")]:
        del sys.modules[name]


def write_fake_mamba_ssm(root, ssd_combined_source: str) -> None:
    """A mamba_ssm whose __init__ fails like the real one without its CUDA extension."""
    triton_dir = root / "mamba_ssm" / "ops" / "triton"
    triton_dir.mkdir(parents=True)
    (root / "mamba_ssm" / "__init__.py").write_text("import selective_scan_cuda_missing_for_the_test\n")
    (root / "mamba_ssm" / "ops" / "__init__.py").write_text("")
    (triton_dir / "__init__.py").write_text("")
    (triton_dir / "ssd_combined.py").write_text(ssd_combined_source)
    (triton_dir / "layernorm_gated.py").write_text("def rmsnorm_fn(*args, **kwargs):\n    return 'rmsnorm'\n")
    (triton_dir / "selective_state_update.py").write_text(
        "def selective_state_update(*args, **kwargs):\n    return 'step'\n"
    )


def test_compat_imports_triton_modules_without_package_init(tmp_path, monkeypatch, no_mamba_ssm):
    write_fake_mamba_ssm(
        tmp_path, "def mamba_chunk_scan_combined(*args, **kwargs):\n    return 'scan', kwargs\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError):  # the fake is faithful: a plain import runs __init__ and fails
        importlib.import_module("mamba_ssm")
    assert "mamba_ssm" not in sys.modules

    scan = compat.get_mamba_chunk_scan_combined()
    assert scan(1, return_final_states=True) == ("scan", {"return_final_states": True})
    assert compat.get_rmsnorm_fn()() == "rmsnorm"
    assert compat.get_selective_state_update()() == "step"
    assert sys.modules["mamba_ssm"].__path__ == [str(tmp_path / "mamba_ssm")]


def test_compat_missing_package_says_how_to_install(tmp_path, monkeypatch, no_mamba_ssm):
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    with pytest.raises(ImportError, match="MAMBA_SKIP_CUDA_BUILD=TRUE pip install"):
        compat.get_mamba_chunk_scan_combined()


def test_compat_broken_submodule_says_how_to_install(tmp_path, monkeypatch, no_mamba_ssm):
    write_fake_mamba_ssm(tmp_path, "import einops_missing_for_the_test\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        ImportError, match="einops_missing_for_the_test.*MAMBA_SKIP_CUDA_BUILD=TRUE pip install"
    ):
        compat.get_mamba_chunk_scan_combined()


def _kernel_for_the_autotuner(n):
    """Never launched. A `def`, not a lambda: outside the interpreter (on a GPU) `triton.jit` finds
    the kernel's source by its `def` line, and fails on a lambda."""


@requires_triton
@pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is None, reason="needs mamba-ssm")
def test_clear_autotuning_forgets_mamba_ssm_choices(monkeypatch):
    """Benchmarks clear the autotuners' choices between models (each tunes for its own calls): plain
    autotuned kernels and those with heuristics around the autotuner (mamba-ssm has both)."""
    import triton

    compat.get_ssd_internals()  # imports the SSD modules
    scan = importlib.import_module("mamba_ssm.ops.triton.ssd_chunk_scan")
    scan._chunk_scan_fwd_kernel.cache[("a", "key")] = scan._chunk_scan_fwd_kernel.configs[0]
    tuned = triton.autotune([triton.Config({})], key=["n"])(triton.jit(_kernel_for_the_autotuner))
    wrapped = types.SimpleNamespace(kernel=triton.heuristics({"unused": lambda args: 0})(tuned), other=len)
    monkeypatch.setitem(sys.modules, "mamba_ssm.ops.triton.wrapped_for_the_test", wrapped)
    tuned.cache[("b",)] = tuned.configs[0]
    assert compat.clear_autotuning() >= len(compat._SSD_INTERNALS) + 1
    assert scan._chunk_scan_fwd_kernel.cache == {} and tuned.cache == {}


@pytest.fixture
def fresh_pins(monkeypatch):
    """No pins before the test; afterwards, none left in mamba-ssm's autotuners for later tests."""
    monkeypatch.setattr(compat, "_PINS", {})
    yield
    compat.clear_autotuning(pins=False)


@requires_triton
@pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is None, reason="needs mamba-ssm")
def test_pin_configs_sets_warps_and_stages_at_the_key(monkeypatch, fresh_pins):
    """A pinned configuration is the kernel's own (same block sizes and pre-hook) with the table's
    warps and stages, used at its key only; clearing keeps it unless asked not to."""
    compat.get_ssd_internals()
    dx = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")._chunk_scan_chunk_state_bwd_dx_kernel
    base = dx.configs[3]
    assert base.pre_hook is not None  # zeroes ddt: it must survive the pin
    key = [128, 24, 128, "torch.bfloat16"]
    table = {dx.base_fn.__name__: [dict(key=key, kwargs=dict(base.kwargs), num_warps=8, num_stages=1)]}
    monkeypatch.setattr(dx, "cache", {})
    assert compat.pin_configs(table) == 1
    pinned = dx.cache[tuple(key)]
    assert (pinned.kwargs, pinned.num_warps, pinned.num_stages) == (base.kwargs, 8, 1)
    assert pinned.pre_hook is base.pre_hook and (base.num_warps, base.num_stages) != (8, 1)
    assert len(dx.cache) == 1
    compat.clear_autotuning()
    assert dx.cache[tuple(key)] is pinned
    compat.clear_autotuning(pins=False)
    assert dx.cache == {}
    compat.clear_autotuning()  # pins come back at the next clearing that keeps them
    assert dx.cache[tuple(key)] is pinned


@requires_triton
@pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is None, reason="needs mamba-ssm")
def test_pin_configs_rejects_unknown_kernels_and_block_sizes(fresh_pins):
    entry = dict(key=[1], kwargs={"BLOCK_SIZE_M": 64}, num_warps=4, num_stages=2)
    with pytest.raises(ValueError, match="no autotuned mamba-ssm kernel named 'not_a_kernel'"):
        compat.pin_configs({"not_a_kernel": [entry]})
    with pytest.raises(ValueError, match="has no configuration with block sizes"):
        compat.pin_configs({"_chunk_scan_fwd_kernel": [dict(entry, kwargs={"BLOCK_SIZE_M": 3})]})
    assert compat._PINS == {}  # nothing half-applied


@requires_triton
@pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is None, reason="needs mamba-ssm")
def test_use_tuned_configs_pins_the_gpu_models_table_or_the_environments(monkeypatch, tmp_path, fresh_pins):
    """The shipped table fits the installed mamba-ssm (every kernel and block size exists); `off`
    and GPUs without a table pin nothing; a path replaces the table; a bad path says so."""
    from lit_matmamba.kernels.ssd.tuned_configs import TABLES

    use = compat.use_tuned_configs.__wrapped__  # the uncached function: the environment changes here
    monkeypatch.delenv("LIT_MATMAMBA_SSD_CONFIGS", raising=False)
    assert use("NVIDIA H200") == sum(map(len, TABLES["NVIDIA H200"].values())) > 0
    assert use("a GPU without a table") == 0
    monkeypatch.setattr(compat, "_PINS", {})
    monkeypatch.setenv("LIT_MATMAMBA_SSD_CONFIGS", "off")
    assert use("NVIDIA H200") == 0 and compat._PINS == {}
    entry = dict(TABLES["NVIDIA H200"]["_chunk_scan_fwd_kernel"][0], num_warps=8)
    (tmp_path / "table.json").write_text(json.dumps({"_chunk_scan_fwd_kernel": [entry]}))
    monkeypatch.setenv("LIT_MATMAMBA_SSD_CONFIGS", str(tmp_path / "table.json"))
    assert use("NVIDIA H200") == 1
    assert [c.num_warps for _, c in compat._PINS["_chunk_scan_fwd_kernel"]] == [8]
    monkeypatch.setenv("LIT_MATMAMBA_SSD_CONFIGS", str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="missing.json.*not a readable JSON table"):
        use("NVIDIA H200")


def test_ssd_tune_chooses_one_config_for_all_widths():
    """scripts/gpu_ssd_tune.py: the default is what the autotuner picks at full width and runs at every
    width; the best minimises the call-weighted sum over widths; pins only beyond the minimum gain."""
    spec = importlib.util.spec_from_file_location("gpu_ssd_tune", ROOT / "scripts" / "gpu_ssd_tune.py")
    tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune)
    cid = lambda w, s: f'{{"kwargs": {{"M": 64}}, "num_stages": {s}, "num_warps": {w}}}'  # noqa: E731
    a, b, c = cid(4, 3), cid(8, 1), cid(2, 2)
    key, widths = (128, 24), [768, 96]
    timings = {
        ("default", "k", key, 768): {a: 1.0, cid(4, 4): 1.1},
        ("default", "k", key, 96): {a: 0.5, cid(4, 4): 0.2},  # the default still runs a here
        ("refined", "k", key, 768): {a: 1.0, b: 0.7, c: 0.6},
        ("refined", "k", key, 96): {a: 0.5, b: 0.2, c: 0.5},  # c is best at 768 only
        ("default", "slow", key, 768): {a: 1.0},
        ("default", "slow", key, 96): {a: 1.0},
        ("refined", "slow", key, 768): {b: 0.99},
        ("refined", "slow", key, 96): {b: 0.99},
    }
    calls = {("k", key, 768): 2, ("k", key, 96): 2, ("slow", key, 768): 1, ("slow", key, 96): 1}
    report, table = tune.choose(timings, calls, widths, min_gain=0.03)
    by_kernel = {e["kernel"]: e for e in report}
    k = by_kernel["k"]
    assert k["default_config"]["num_warps"] == 4 and k["step_ms_default"] == pytest.approx(3.0)
    assert (k["best_config"]["num_warps"], k["best_config"]["num_stages"]) == (8, 1)  # 1.8 < 2.2 (c)
    assert k["step_ms_best"] == pytest.approx(1.8)
    assert by_kernel["slow"]["step_ms_best"] == pytest.approx(1.98)  # 1% faster: reported, not pinned
    assert table == {"k": [dict(key=[128, 24], kwargs={"M": 64}, num_warps=8, num_stages=1)]}


# ---------------------------------------------------------------------------------------------------
# GPU: realistic sizes


@pytest.mark.gpu
@needs_cuda
@requires_triton
@pytest.mark.parametrize("init", [False, True], ids=["no-init", "init"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_causal_conv1d_gpu_realistic(dtype, init):
    bsz, seqlen, channels = 2, 2048, 2 * 128 + 128 * 64  # ngroups 1, d_state 128, 128 heads of 64
    leaves, names, op = run_conv(
        bsz, seqlen, channels, 4, True, init, True, dtype, weight_dtype=torch.float32
    )
    leaves = [leaf(t) for t in leaves]
    y, final = op(*leaves, backend="triton")
    dy, dfinal = torch.randn_like(y), torch.randn_like(final)
    grads = torch.autograd.grad([y, final], leaves, [dy, dfinal])
    ref_leaves = as_float64(leaves)
    y_ref, final_ref = op(*ref_leaves, backend="reference")
    ref_grads = torch.autograd.grad([y_ref, final_ref], ref_leaves, [dy.double(), dfinal.double()])
    assert_close(y, y_ref, dtype, "y")
    assert_close(final, final_ref, dtype, "final_state")
    for name, g, g_ref, t in zip(names, grads, ref_grads, leaves):
        assert_close(g, g_ref, t.dtype, name)


@pytest.mark.gpu
@needs_cuda
@requires_triton
@pytest.mark.parametrize(
    "ngroups, norm_before_gate", [(1, False), (8, False), (8, True)], ids=["G1", "G8", "G8-norm-before-gate"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gated_rmsnorm_gpu_realistic(dtype, ngroups, norm_before_gate):
    bsz, seqlen, d = 2, 2048, 8192
    x = leaf(torch.randn(bsz, seqlen, d, device=DEVICE).to(dtype))
    zxbcdt = leaf(torch.randn(bsz, seqlen, 2 * d + 300, device=DEVICE).to(dtype))  # z is its first d channels
    w_param = leaf(1 + 0.3 * torch.randn(d + 512, device=DEVICE))
    leaves = [x, zxbcdt, w_param]

    def op(x, zxbcdt, w_param, backend):
        return gated_rmsnorm(
            x, zxbcdt[..., :d], w_param[:d], 1e-5, d // ngroups, norm_before_gate, backend=backend
        )

    y = op(*leaves, backend="triton")
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, dy)
    ref_leaves = as_float64(leaves)
    y_ref = op(*ref_leaves, backend="reference")
    ref_grads = torch.autograd.grad(y_ref, ref_leaves, dy.double())
    assert_close(y, y_ref, dtype, "y")
    for name, g, g_ref, t in zip(["dx", "dz", "dweight"], grads, ref_grads, leaves):
        assert_close(g, g_ref, t.dtype, name)


def ssd_inputs(bsz=2, seqlen=1000, nheads=8, headdim=64, ngroups=2, dstate=64, init=True):
    """fp32 inputs in the ranges of a trained Mamba2 layer (dt after softplus ~ 0.001..0.1)."""
    return dict(
        x=torch.randn(bsz, seqlen, nheads, headdim, device=DEVICE),
        dt=torch.randn(bsz, seqlen, nheads, device=DEVICE) - 2.0,
        A=-torch.rand(nheads, device=DEVICE) * 4 - 0.5,
        B=torch.randn(bsz, seqlen, ngroups, dstate, device=DEVICE) / dstate**0.5,
        C=torch.randn(bsz, seqlen, ngroups, dstate, device=DEVICE) / dstate**0.5,
        D=torch.randn(nheads, device=DEVICE),
        dt_bias=torch.randn(nheads, device=DEVICE) * 0.5,
        initial_state=torch.randn(bsz, nheads, headdim, dstate, device=DEVICE) if init else None,
    )


@pytest.mark.gpu
@needs_cuda
@requires_triton
@pytest.mark.parametrize("init", [False, True], ids=["no-init", "init"])
def test_ssd_triton_gpu_matches_reference(init):
    try:
        compat.get_mamba_chunk_scan_combined()
    except ImportError as e:
        pytest.skip(str(e))
    inputs = {k: leaf(v) for k, v in ssd_inputs(init=init).items() if v is not None}
    names = list(inputs)
    y, final = ssd_scan(**inputs, chunk_size=256, backend="triton")
    assert final.dtype == torch.float32
    dy, dfinal = torch.randn_like(y), torch.randn_like(final)
    grads = torch.autograd.grad([y, final], list(inputs.values()), [dy, dfinal])
    ref_inputs = dict(zip(names, as_float64(list(inputs.values()))))
    y_ref, final_ref = ssd_scan(**ref_inputs, chunk_size=256, backend="reference")
    ref_grads = torch.autograd.grad(
        [y_ref, final_ref], list(ref_inputs.values()), [dy.double(), dfinal.double()]
    )
    # mamba-ssm's kernels multiply in TF32, hence 1e-3-level errors.
    assert rel_err(y, y_ref) < 3e-3
    assert rel_err(final, final_ref) < 3e-3
    for name, g, g_ref in zip(names, grads, ref_grads):
        assert rel_err(g, g_ref) < 1e-2, name
