"""The Triton kernels against the PyTorch references: outputs and gradients.

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py),
so shapes stay tiny; with CUDA the same tests run on the GPU, and the
`gpu`-marked ones add realistic sizes and mamba-ssm's SSD scan. The oracle is the reference run in
float64 on the same (rounded) inputs, so bf16 results may differ from it by their output rounding.
Outputs of the kernels are allocated NaN-filled (the `poisoned_outputs` fixture), so an element a
kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys

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

from lit_matmamba import kernels
from lit_matmamba.kernels import backend, causal_conv1d, gated_rmsnorm, ssd_scan
from lit_matmamba.kernels import mamba_ssm_compat as compat

pytestmark = pytest.mark.usefixtures("poisoned_outputs")
UNPOISONED = backend.empty_output  # bound at import, before the fixture patches it


# ---------------------------------------------------------------------------------------------------
# the poisoned_outputs fixture (conftest.py)


@requires_triton
def test_poisoned_outputs_show_an_element_a_kernel_leaves_unwritten(monkeypatch):
    """A conv forward whose kernel writes only the first half of y's times: the rest reads NaN."""
    kernel = importlib.import_module("lit_matmamba.kernels.causal_conv1d.kernel")

    class HalfWrite:  # stands in for the Triton kernel, with the launcher's arguments
        def __getitem__(self, grid):
            def launch(x, weight, bias, init, y, final_state, *args, **kwargs):
                y[:, : y.shape[1] // 2] = 0.0
                final_state.zero_()

            return launch

    monkeypatch.setattr(kernel, "_conv_fwd_kernel", HalfWrite())
    x = torch.randn(2, 10, 4, device=DEVICE)
    y, final = causal_conv1d(x, torch.randn(4, 4, device=DEVICE), backend="triton")
    assert not y[:, :5].isnan().any() and y[:, 5:].isnan().all()
    assert not final.isnan().any()


@requires_triton
def test_poisoned_outputs_reach_every_kernel_module():
    """No kernel module keeps a binding of its own to the allocation helper, which the fixture's
    patch would miss (for modules imported before it): each calls it through `backend`."""
    helpers = (UNPOISONED, backend.empty_output)
    assert helpers[1] is not helpers[0]
    for info in pkgutil.walk_packages(kernels.__path__, f"{kernels.__name__}."):
        module = importlib.import_module(info.name)
        if module is not backend:
            assert not any(v is h for v in vars(module).values() for h in helpers), info.name


@requires_triton
def test_the_backend_asks_triton_whether_it_interprets(monkeypatch):
    """CPU tensors take the Triton backend only where Triton runs kernels in its interpreter."""
    import triton

    if not hasattr(triton, "knobs"):
        pytest.skip("Triton < 3.4 has no knobs")
    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)
    assert not backend.interpreting()
    with pytest.raises(RuntimeError, match="needs TRITON_INTERPRET=1"):
        backend.use_triton("triton", torch.zeros(1))
    monkeypatch.setattr(triton.knobs.runtime, "interpret", True)
    assert backend.interpreting() and backend.use_triton("triton", torch.zeros(1))


def test_the_kernel_benchmark_checks_its_ops_then_needs_a_gpu(monkeypatch):
    from lit_matmamba.bench.kernels import kernels as bench_kernels

    with pytest.raises(ValueError, match=r"unknown ops \['convolution'\]"):
        bench_kernels(ops=["conv", "convolution"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        bench_kernels(ops=["conv"])


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


@requires_triton
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
def test_causal_conv1d_bwd_short_runs_match_reference(monkeypatch, bsz, seqlen, channels, k, bias, init, act,
                                                      dtype, extra):  # fmt: skip
    """Runs shorter than the backward's 64 steps, so that tiny sequences span several programs and
    the unrolled loop's last iteration reaches past a run."""
    kernel = importlib.import_module("lit_matmamba.kernels.causal_conv1d.kernel")
    monkeypatch.setattr(kernel, "_BWD_CHUNK", 6)
    check_conv(bsz, seqlen, channels, k, bias, init, act, dtype, extra)


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
