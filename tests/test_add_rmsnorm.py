"""The fused residual add + RMSNorm: the Triton kernel against the reference, and the stack built on it.

Without CUDA the kernel runs under the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py),
so shapes stay tiny; the `gpu`-marked tests add realistic sizes. The
oracle is the reference run in float64 on the same (rounded) inputs. Kernel outputs are allocated
NaN-filled (the `poisoned_outputs` fixture), so an element the kernel forgets to write fails the
comparison.
"""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE, DTYPE_NAMES, assert_close, leaf, needs_cuda, requires_triton

from lit_matmamba import MatMambaConfig, MatMambaLM
from lit_matmamba.kernels import add_rmsnorm

F32, BF16 = torch.float32, torch.bfloat16


@pytest.fixture(autouse=True)
def _poison_outputs_and_seed(poisoned_outputs):
    torch.manual_seed(0)


# ---------------------------------------------------------------------------------------------------
# The op


def case(bsz, seqlen, d, x=F32, residual=F32, weight=F32, out=None, grads="both", layout="contiguous"):
    """x: x's dtype, or None (the first block); out: out_dtype; grads: which outputs get a gradient
    ("both", "y": residual_out unused as after the last block, "residual_out": y unused);
    layout: "contiguous", "rows" (x and residual slices of wider tensors: strided rows) or
    "transposed" (leading dims that do not merge: the launcher copies)."""
    name = f"B{bsz}-L{seqlen}-D{d}-x{DTYPE_NAMES[x] if x else 'None'}-res{DTYPE_NAMES[residual]}"
    name += f"-w{DTYPE_NAMES[weight]}-out{DTYPE_NAMES[out] if out else 'default'}-grad-{grads}-{layout}"
    return pytest.param(bsz, seqlen, d, x, residual, weight, out, grads, layout, id=name)


@requires_triton
@pytest.mark.parametrize(
    "bsz, seqlen, d, x_dtype, res_dtype, w_dtype, out_dtype, grads, layout",
    [
        case(2, 5, 24),
        case(2, 5, 24, grads="y"),
        case(2, 5, 24, grads="residual_out"),
        case(2, 5, 24, x=BF16, out=BF16),  # the stack under autocast: fp32 stream and weight
        case(2, 5, 24, x=BF16, residual=BF16, weight=BF16),  # a bf16 model (vision)
        case(2, 5, 24, x=BF16, grads="y"),  # bf16 y by default (x's dtype)
        case(2, 5, 24, out=BF16),  # fp32 inputs, bf16 output
        case(1, 7, 40, x=None),  # the first block: residual_out = residual
        case(1, 7, 40, x=None, out=BF16, grads="y"),
        case(2, 3, 16, x=None, residual=BF16),
        # Tiles of 2048 elements forward, 8192 backward (D padded); 4 backward programs at most on CPU.
        case(3, 25, 100, out=BF16),  # D not a power of 2; 5 forward tiles of 16 rows, 2 backward programs
        case(2, 75, 24, x=BF16, out=BF16),  # 3 forward tiles of 64 rows, the last partial
        case(2, 25, 2000, x=BF16, out=BF16),  # 4 backward programs of 4 tiles of 4 rows, the last 2 rows
        case(2, 9, 24, layout="rows"),
        case(2, 9, 24, x=BF16, layout="transposed"),
        case(2, 9, 24, x=torch.float16, residual=torch.float16, weight=torch.float16),
    ],
)
def test_add_rmsnorm_matches_reference(bsz, seqlen, d, x_dtype, res_dtype, w_dtype, out_dtype, grads, layout):
    lead = (seqlen, bsz) if layout == "transposed" else (bsz, seqlen)
    x_base = torch.randn(*lead, d + 5, device=DEVICE).to(x_dtype) if x_dtype else None
    res_base = (3 * torch.randn(*lead, d + 3, device=DEVICE)).to(res_dtype)
    w_param = (1 + 0.3 * torch.randn(d + 8, device=DEVICE)).to(w_dtype)
    leaves = [leaf(t) for t in (res_base, w_param, x_base) if t is not None]

    def cut(base: torch.Tensor) -> torch.Tensor:
        """(.., .., d + extra) -> (B, L, d) in the case's layout."""
        if layout == "transposed":
            return base.transpose(0, 1)[..., :d]
        return base[..., :d] if layout == "rows" else base[..., :d].contiguous()

    def op(res_base, w_param, *x_base, out_dtype, backend):
        x = cut(x_base[0]) if x_base else None
        return add_rmsnorm(x, cut(res_base), w_param[:d], 1e-5, out_dtype=out_dtype, backend=backend)

    y, res_out = op(*leaves, out_dtype=out_dtype, backend="triton")
    expected_out = out_dtype or x_dtype or res_dtype
    assert y.dtype == expected_out and res_out.dtype == torch.float32
    outputs = {"both": [y, res_out], "y": [y], "residual_out": [res_out]}[grads]
    douts = [torch.randn_like(t) for t in outputs]
    grads_ = torch.autograd.grad(outputs, leaves, douts, materialize_grads=True)

    ref_leaves = [leaf(t.double()) for t in leaves]
    y_ref, res_out_ref = op(*ref_leaves, out_dtype=torch.float64, backend="reference")
    ref_outputs = {"both": [y_ref, res_out_ref], "y": [y_ref], "residual_out": [res_out_ref]}[grads]
    ref_grads = torch.autograd.grad(
        ref_outputs, ref_leaves, [t.double() for t in douts], materialize_grads=True
    )  # dweight is 0 when y is unused

    assert_close(y, y_ref, expected_out, "y")
    assert_close(res_out, res_out_ref, torch.float32, "residual_out")
    for name, g, g_ref, t in zip(["dresidual", "dweight", "dx"], grads_, ref_grads, leaves):
        assert g.dtype == t.dtype, name
        assert_close(g, g_ref, t.dtype, name)
    # Only the prefix the op used gets a gradient.
    assert grads_[1][d:].abs().max() == 0


@requires_triton
def test_add_rmsnorm_reference_is_unfused_add_and_rmsnorm():
    """Both backends compute residual + x and torch's RMSNorm of it, in float32."""
    x, residual = torch.randn(2, 9, 24, device=DEVICE), torch.randn(2, 9, 24, device=DEVICE)
    norm = torch.nn.RMSNorm(24, eps=1e-5, device=DEVICE)
    with torch.no_grad():
        norm.weight.normal_()
    for backend in ("reference", "triton"):
        y, res_out = add_rmsnorm(x, residual, norm.weight, 1e-5, backend=backend)
        torch.testing.assert_close(res_out, residual + x, rtol=0, atol=0)
        torch.testing.assert_close(y, norm(residual + x), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# The residual stack


WIDTHS = [None, 32, 16, 8, [64, 8]]
WIDTH_IDS = ["full", "w32", "w16", "w8", "mixnmatch"]


def unfused_forward(model: MatMambaLM, ids: torch.Tensor, width) -> torch.Tensor:
    """The stack written the plain way: x + mixer(norm(x)) per block, then the final norm."""
    widths = model.config.resolve(width)
    h = model.backbone.embedding(ids)  # (B, L, D)
    for layer, w in zip(model.backbone.layers, widths):
        h = h + layer.mixer(layer.norm(h), w)
    return model.lm_head(model.backbone.norm_f(h))


@pytest.mark.parametrize("width", WIDTHS, ids=WIDTH_IDS)
def test_stack_equals_unfused_blocks(width):
    model = MatMambaLM(MatMambaConfig.from_name("lm-tiny", backend="reference"))
    ids = torch.randint(0, 4096, (2, 37))
    logits, expected = model(ids, width), unfused_forward(model, ids, width)
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)
    params = list(model.parameters())
    grads = torch.autograd.grad(logits.square().sum(), params)
    expected_grads = torch.autograd.grad(expected.square().sum(), params)
    for g, g_ref in zip(grads, expected_grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)


@requires_triton
@pytest.mark.parametrize("width", WIDTHS, ids=WIDTH_IDS)
def test_lm_triton_backend_matches_reference(width, monkeypatch):
    """The whole model with backend "triton" (add_rmsnorm, conv and gated-norm kernels) against
    "reference". The SSD scan runs the reference in both, outside the fused core: mamba-ssm's
    kernels are slow under the interpreter (tests/test_ssd_fused.py runs the model with them, and
    tests/test_gpu_path.py at every width on the GPU)."""
    from lit_matmamba.kernels import ssd

    ssd_scan = ssd.ssd_scan
    monkeypatch.setattr(ssd, "_fused_available", lambda: False)
    monkeypatch.setattr(
        ssd, "ssd_scan", lambda *args, **kw: ssd_scan(*args, **{**kw, "backend": "reference"})
    )
    fast = MatMambaLM(MatMambaConfig.from_name("lm-tiny", backend="triton")).to(DEVICE)
    ref = MatMambaLM(MatMambaConfig.from_name("lm-tiny", backend="reference")).to(DEVICE)
    ref.load_state_dict(fast.state_dict())
    ids = torch.randint(0, 4096, (2, 37), device=DEVICE)  # 37: two chunks, the last partial
    logits = [model(ids, width) for model in (fast, ref)]
    assert_close(logits[0], logits[1], torch.float32, "logits")
    dlogits = torch.randn_like(logits[1])
    grads = [
        torch.autograd.grad(out, list(model.parameters()), dlogits) for out, model in zip(logits, (fast, ref))
    ]
    for (name, _), g, g_ref in zip(fast.named_parameters(), *grads):
        assert_close(g, g_ref, torch.float32, name)


def test_stack_writes_the_autocast_dtype_and_keeps_a_float32_stream():
    """Under autocast the mixers get bf16 inputs from the norm and the residual stays float32."""
    model = MatMambaLM(MatMambaConfig.from_name("lm-tiny", backend="reference"))
    seen = []
    for layer in model.backbone.layers:
        layer.mixer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
        layer.register_forward_hook(lambda mod, args, out: seen.append(out[1].dtype))
    ids = torch.randint(0, 4096, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = model.forward_features(ids)
    assert seen == [torch.bfloat16, torch.float32] * 2 and features.dtype == torch.bfloat16
    seen.clear()
    assert model.forward_features(ids).dtype == torch.float32
    assert seen == [torch.float32, torch.float32] * 2


# ---------------------------------------------------------------------------------------------------
# GPU: realistic sizes


@pytest.mark.gpu
@needs_cuda
@requires_triton
@pytest.mark.parametrize("d", [2048, 2560, 8192], ids=lambda d: f"D{d}")
@pytest.mark.parametrize(
    "x_dtype, out_dtype",
    [(F32, None), (BF16, BF16), (None, BF16)],
    ids=["fp32", "bf16-autocast", "first-block"],
)
def test_add_rmsnorm_gpu_realistic(d, x_dtype, out_dtype):
    bsz, seqlen = 4, 2048
    x = leaf(torch.randn(bsz, seqlen, d, device=DEVICE).to(x_dtype)) if x_dtype else None
    residual = leaf(3 * torch.randn(bsz, seqlen, d, device=DEVICE))
    weight = leaf(1 + 0.3 * torch.randn(d, device=DEVICE))
    leaves = [t for t in (residual, weight, x) if t is not None]

    y, res_out = add_rmsnorm(x, residual, weight, 1e-5, out_dtype=out_dtype, backend="triton")
    dy, dres_out = torch.randn_like(y), torch.randn_like(res_out)
    grads = torch.autograd.grad([y, res_out], leaves, [dy, dres_out])
    ref_leaves = [leaf(t.double()) for t in leaves]
    x_ref = ref_leaves[2] if x is not None else None
    y_ref, res_out_ref = add_rmsnorm(
        x_ref, ref_leaves[0], ref_leaves[1], 1e-5, out_dtype=torch.float64, backend="reference"
    )
    ref_grads = torch.autograd.grad([y_ref, res_out_ref], ref_leaves, [dy.double(), dres_out.double()])
    assert_close(y, y_ref, y.dtype, "y")
    assert_close(res_out, res_out_ref, torch.float32, "residual_out")
    for name, g, g_ref, t in zip(["dresidual", "dweight", "dx"], grads, ref_grads, leaves):
        assert g.dtype == t.dtype, name
        assert_close(g, g_ref, t.dtype, name)
