"""The cross-entropy of the LM loss: the Triton kernel against the reference, and the model's loss on it.

Without CUDA the kernel runs under the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py),
so shapes stay tiny and the vocabulary block is made small (`block_v`) so that a row takes several
blocks; the `gpu`-marked tests add realistic sizes and CUDA-graph capture. The oracle is the
reference run in float64 on the same (rounded) logits. Kernel outputs are allocated NaN-filled
(the `poisoned_outputs` fixture), so an element the kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import DEVICE, DTYPE_NAMES, assert_close, leaf, needs_cuda, requires_triton

from lit_matmamba import MatMambaConfig, MatMambaLM
from lit_matmamba.kernels import cross_entropy
from lit_matmamba.kernels.cross_entropy import cross_entropy_ref

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


@pytest.fixture(autouse=True)
def _poison_outputs_and_seed(poisoned_outputs):
    torch.manual_seed(0)


def triton_ce(logits, target, ignore_index=-100, block_v=None):
    from lit_matmamba.kernels.cross_entropy.kernel import cross_entropy_triton

    return cross_entropy_triton(logits, target, ignore_index, block_v=block_v)


def make_logits(rows: int, vocab: int, dtype: torch.dtype, layout: str = "contiguous") -> torch.Tensor:
    """(rows, vocab) logits of scale ~3, with rows that test the online max: row 0 grows along the
    vocabulary (the max moves into every new block), row 1 sits near 1000 (exp overflows without
    the max shifted out). layout: "contiguous", "rows" (a slice of wider rows: row stride > vocab)
    or "columns" (a transpose: vocabulary stride > 1, which the launcher copies)."""
    x = 3 * torch.randn(rows, vocab + 7, device=DEVICE)
    x[0] += torch.linspace(0, 60, vocab + 7, device=DEVICE)
    if rows > 1:
        x[1] += 1000
    if layout == "columns":
        return x[:, :vocab].t().contiguous().to(dtype).t()
    x = x.to(dtype)
    return x[:, :vocab] if layout == "rows" else x[:, :vocab].contiguous()


def make_target(rows: int, vocab: int, ignored: int = 0, ignore_index: int = -100) -> torch.Tensor:
    """(rows,) class indices, the first and last in range ends, every `ignored`-th row from row 2
    ignored."""
    t = torch.randint(0, vocab, (rows,), device=DEVICE)
    t[0] = vocab - 1
    t[-1] = 0
    if ignored:
        t[2::ignored] = ignore_index
    return t


def reference_loss_and_grad(logits, target, ignore_index=-100, scale=0.25):
    ref = leaf(logits.detach().double())
    loss = cross_entropy_ref(ref, target, ignore_index)
    (loss * scale).backward()
    return loss, ref.grad


def case(rows, vocab, dtype=F32, block_v=None, layout="contiguous", ignored=0, ignore_index=-100):
    name = f"N{rows}-V{vocab}-{DTYPE_NAMES[dtype]}-block{block_v or 'default'}-{layout}"
    name += f"-ignore{ignored}@{ignore_index}" if ignored else ""
    return pytest.param(rows, vocab, dtype, block_v, layout, ignored, ignore_index, id=name)


@requires_triton
@pytest.mark.parametrize(
    "rows, vocab, dtype, block_v, layout, ignored, ignore_index",
    [
        case(1, 7, F32),  # one row, a vocabulary smaller than a block
        case(5, 100, BF16),  # the default block: one block of 128
        case(13, 1037, F32, block_v=256),  # 5 blocks, the last partial
        case(13, 1037, BF16, block_v=256),
        case(7, 512, F32, block_v=128),  # V a multiple of the block
        case(40, 1100, BF16, block_v=512, ignored=3),
        case(9, 333, F32, block_v=64, ignored=2, ignore_index=5),  # a class index as ignore_index
        case(11, 300, F32, block_v=128, layout="rows"),  # strided rows, read in place
        case(11, 300, BF16, block_v=128, layout="rows", ignored=4),
        case(6, 129, BF16, block_v=64, layout="columns"),  # vocabulary not unit-stride: copied
        case(8, 257, F16, block_v=64),
    ],
)
def test_cross_entropy_matches_reference(rows, vocab, dtype, block_v, layout, ignored, ignore_index):
    logits = leaf(make_logits(rows, vocab, dtype, layout))
    target = make_target(rows, vocab, ignored, ignore_index)
    loss = triton_ce(logits, target, ignore_index, block_v=block_v)
    (loss * 0.25).backward()  # grad_output 0.25
    loss_ref, grad_ref = reference_loss_and_grad(logits, target, ignore_index)

    assert loss.shape == () and loss.dtype == F32
    assert_close(loss, loss_ref, F32, "loss")
    assert logits.grad.dtype == dtype and logits.grad.shape == (rows, vocab)
    assert_close(logits.grad, grad_ref, dtype, "dlogits")
    if ignored:
        assert (logits.grad[target == ignore_index] == 0).all(), "ignored rows get a zero gradient"


@requires_triton
def test_cross_entropy_dispatch_and_target_dtypes():
    """`cross_entropy` picks the kernel with backend "triton" and the reference with "reference";
    an int32 or a strided target gives the same loss as an int64 one; logits that need no gradient
    are fine."""
    logits = make_logits(10, 90, BF16)
    target = make_target(10, 90, ignored=4)
    expected = F.cross_entropy(logits.float(), target)
    strided = torch.stack([target, torch.zeros_like(target)], 1)[:, 0]  # (10,), stride 2
    for backend in ("triton", "reference"):
        for t in (target, target.int(), strided):
            loss = cross_entropy(logits, t, backend=backend)
            assert loss.dtype == F32 and not loss.requires_grad
            torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


@requires_triton
def test_cross_entropy_all_ignored_is_nan_with_zero_gradient():
    """As torch: the mean over no rows is NaN, and the gradient is 0."""
    logits = leaf(make_logits(6, 50, F32))
    target = torch.full((6,), -100, device=DEVICE)
    loss = cross_entropy(logits, target, backend="triton")
    loss.backward()
    ref = leaf(logits.detach())
    torch_loss = F.cross_entropy(ref, target)
    torch_loss.backward()
    assert torch.isnan(loss) and torch.isnan(torch_loss)
    torch.testing.assert_close(logits.grad, ref.grad, rtol=0, atol=0)


@requires_triton
def test_cross_entropy_no_rows_is_nan():
    logits = leaf(torch.randn(0, 30, device=DEVICE))
    target = torch.zeros(0, dtype=torch.long, device=DEVICE)
    loss = cross_entropy(logits, target, backend="triton")
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(logits.detach(), target))
    assert logits.grad.shape == (0, 30)


@requires_triton
def test_cross_entropy_target_out_of_range_is_nan():
    """torch raises (a host sync); the kernel makes the loss NaN instead, so that it does not pass
    unnoticed."""
    logits = make_logits(4, 20, F32)
    for bad in (20, -1):
        target = torch.tensor([3, bad, 5, 0], device=DEVICE)
        assert torch.isnan(cross_entropy(logits, target, backend="triton"))


@requires_triton
def test_cross_entropy_ignored_rows_are_not_read():
    """An ignored row's logits (here inf and NaN padding) do not reach the loss or the gradient."""
    logits = make_logits(5, 40, F32)
    logits[1] = float("nan")
    logits[3, :7] = float("inf")
    logits = leaf(logits)
    target = torch.tensor([1, -100, 7, -100, 39], device=DEVICE)
    loss = triton_ce(logits, target, block_v=16)
    loss.backward()
    kept = torch.tensor([0, 2, 4])
    loss_ref, grad_ref = reference_loss_and_grad(logits[kept], target[kept], scale=1.0)
    assert_close(loss, loss_ref, F32, "loss")
    assert_close(logits.grad[kept], grad_ref, F32, "dlogits")
    assert (logits.grad[[1, 3]] == 0).all()


@requires_triton
def test_cross_entropy_strided_target_and_unchanged_logits():
    """A strided target is read in place (forward and backward), and the logits are not written."""
    logits = leaf(make_logits(7, 130, BF16))
    before = logits.detach().clone()
    target = make_target(7, 130, ignored=3)
    strided = torch.stack([target, torch.zeros_like(target)], 1)[:, 0]  # (7,), stride 2
    loss = triton_ce(logits, strided, block_v=32)
    (loss * 0.25).backward()
    assert torch.equal(logits.detach(), before)
    loss_ref, grad_ref = reference_loss_and_grad(logits, target)
    assert_close(loss, loss_ref, F32, "loss")
    assert_close(logits.grad, grad_ref, BF16, "dlogits")


@requires_triton
@pytest.mark.parametrize(
    "dtype, layout, ignore_index",
    [(F32, "contiguous", -100), (BF16, "rows", -100), (F32, "columns", 5)],
    ids=["fp32", "bf16-strided-rows", "fp32-transposed-ignore5"],
)
def test_cross_entropy_per_row_losses_match_reference(dtype, layout, ignore_index):
    """reduction "none": the per-row losses (0 for ignored rows, as torch), and a gradient that
    scales each row by its own grad_output, without the mean's count."""
    rows, vocab = 13, 300
    logits = leaf(make_logits(rows, vocab, dtype, layout))
    target = make_target(rows, vocab, ignored=3, ignore_index=ignore_index)
    from lit_matmamba.kernels.cross_entropy.kernel import cross_entropy_triton

    losses = cross_entropy_triton(logits, target, ignore_index, block_v=64, reduction="none")
    dout = torch.rand(rows, device=DEVICE) + 0.5
    losses.backward(dout)
    ref = leaf(logits.detach().double())
    ref_losses = cross_entropy_ref(ref, target, ignore_index, reduction="none")
    ref_losses.backward(dout.double())

    assert losses.shape == (rows,) and losses.dtype == F32
    assert_close(losses, ref_losses, F32, "losses")
    assert (losses[target == ignore_index] == 0).all()
    assert logits.grad.dtype == dtype
    assert_close(logits.grad, ref.grad, dtype, "dlogits")
    assert (logits.grad[target == ignore_index] == 0).all()


@requires_triton
def test_cross_entropy_per_row_dispatch_and_bad_reduction():
    """Both backends give torch's per-row losses; a reduction other than "mean"/"none" is refused."""
    logits = make_logits(6, 70, BF16)
    target = make_target(6, 70, ignored=2)
    expected = F.cross_entropy(logits.float(), target, reduction="none")
    for backend in ("triton", "reference"):
        losses = cross_entropy(logits, target, backend=backend, reduction="none")
        # Row 1's logits sit near 1000: float32 summation order moves its loss by ~1e-5.
        torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-4)
        with pytest.raises(ValueError, match="reduction"):
            cross_entropy(logits, target, backend=backend, reduction="sum")


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=requires_triton)])
@pytest.mark.parametrize(
    "logits_shape, logits_dtype, target_shape, target_dtype, match",
    [
        ((12,), F32, (12,), torch.long, "2-D float"),
        ((2, 3, 12), F32, (6,), torch.long, "2-D float"),
        ((4, 12), torch.long, (4,), torch.long, "2-D float"),
        ((4, 0), F32, (4,), torch.long, "empty vocabulary"),
        ((4, 12), F32, (4,), F32, "1-D integer"),
        ((4, 12), F32, (4,), torch.bool, "1-D integer"),
        ((4, 12), F32, (4, 1), torch.long, "1-D integer"),
        ((4, 12), F32, (5,), torch.long, "5 entries for 4 rows"),
    ],
    ids=[
        "logits-1d",
        "logits-3d",
        "logits-int",
        "empty-vocab",
        "target-float",
        "target-bool",
        "target-2d",
        "length-mismatch",
    ],
)
def test_cross_entropy_rejects_bad_inputs(
    backend, logits_shape, logits_dtype, target_shape, target_dtype, match
):
    logits = torch.zeros(logits_shape, dtype=logits_dtype, device=DEVICE)
    target = torch.zeros(target_shape, dtype=target_dtype, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        cross_entropy(logits, target, backend=backend)


@requires_triton
def test_cross_entropy_rejects_a_block_that_is_not_a_power_of_2():
    with pytest.raises(ValueError, match="power of 2"):
        triton_ce(
            torch.zeros(2, 8, device=DEVICE), torch.zeros(2, dtype=torch.long, device=DEVICE), block_v=48
        )


# ---------------------------------------------------------------------------------------------------
# The model's loss


def test_lm_loss_is_the_next_token_cross_entropy():
    """`MatMambaLM.loss` (reference backend) is torch's float32 cross-entropy of the shifted logits."""
    model = MatMambaLM(MatMambaConfig.from_name("lm-tiny", backend="reference"))
    ids = torch.randint(0, 4096, (2, 11))
    logits = model(ids[:, :-1])
    expected = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
    torch.testing.assert_close(model.loss(ids), expected, rtol=0, atol=0)


@requires_triton
@pytest.mark.parametrize("width", [None, 8], ids=["full", "w8"])
def test_lm_loss_triton_backend_matches_reference(width, monkeypatch):
    """`MatMambaLM("lm-tiny").loss` and the parameter gradients through it with config backend
    "triton" against "reference". Only the loss differs: the blocks keep the reference path (their
    kernels are tested in test_add_rmsnorm.py, test_kernels.py and, whole, in test_gpu_path.py), as
    the mixers and norms hold the config they were built with while `loss` reads the model's. The
    vocabulary block is cut to 1024, so a row of the 4096-token vocabulary takes 4 blocks."""
    from lit_matmamba.kernels.cross_entropy import kernel

    monkeypatch.setattr(kernel, "_BLOCK_V", 1024)
    cfg = MatMambaConfig.from_name("lm-tiny", backend="reference")
    ref = MatMambaLM(cfg).to(DEVICE)
    fast = MatMambaLM(cfg).to(DEVICE)
    fast.load_state_dict(ref.state_dict())
    fast.config = dataclasses.replace(cfg, backend="triton")
    ids = torch.randint(0, 4096, (2, 20), device=DEVICE)
    losses = [model.loss(ids, width) for model in (fast, ref)]
    assert type(losses[0].grad_fn).__name__ == "_CrossEntropyFnBackward", "the loss ran the kernel"
    assert type(losses[1].grad_fn).__name__ == "NllLossBackward0"
    assert losses[0].dtype == F32
    assert_close(losses[0], losses[1], F32, "loss")
    grads = [torch.autograd.grad(loss, list(model.parameters())) for loss, model in zip(losses, (fast, ref))]
    for (name, _), g, g_ref in zip(fast.named_parameters(), *grads):
        assert_close(g, g_ref, F32, name)


@requires_triton
def test_language_modeling_loss_is_the_model_loss():
    """The training module's LM loss is `MatMambaLM.loss`, on the model config's backend (only the
    loss on "triton" here, as in the test above)."""
    from lit_matmamba.training import LanguageModeling

    cfg = MatMambaConfig.from_name("lm-tiny", backend="reference")
    module = LanguageModeling(MatMambaLM(cfg).to(DEVICE))
    ids = torch.randint(0, 4096, (2, 9), device=DEVICE)
    expected = module.model.loss(ids, 16)
    module.model.config = dataclasses.replace(cfg, backend="triton")
    loss = module.loss(ids, 16)
    assert type(loss.grad_fn).__name__ == "_CrossEntropyFnBackward"
    assert_close(loss, expected, F32, "loss")


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=requires_triton)])
def test_language_modeling_predict_step_is_the_per_sequence_loss(backend, monkeypatch):
    """predict_step: per sequence and evaluated width, the mean of torch's float32 per-token
    cross-entropy, on either backend's `cross_entropy` (only the loss on "triton" here, as in the
    test above)."""
    from lit_matmamba.training import LanguageModeling

    cfg = MatMambaConfig.from_name("lm-tiny", backend="reference")
    module = LanguageModeling(MatMambaLM(cfg).to(DEVICE))
    module.model.config = dataclasses.replace(cfg, backend=backend)
    calls = []
    if backend == "triton":  # count the kernel's calls
        from lit_matmamba.kernels.cross_entropy import kernel

        triton_ce = kernel.cross_entropy_triton
        monkeypatch.setattr(
            kernel, "cross_entropy_triton", lambda *a, **k: calls.append(k) or triton_ce(*a, **k)
        )
    ids = torch.randint(0, 4096, (3, 9), device=DEVICE)
    out = module.predict_step(ids, 0)
    if backend == "triton":
        assert calls == [{"reduction": "none"}] * len(module.evaluated())
    assert sorted(out) == sorted(f"loss/{label}" for label, _ in module.evaluated())
    for label, width in module.evaluated():
        with torch.no_grad():
            logits = module.model(ids[:, :-1], width=width).float()  # (3, 8, V)
        expected = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)  # (3,)
        assert out[f"loss/{label}"].shape == (3,)
        torch.testing.assert_close(out[f"loss/{label}"], expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# GPU: realistic sizes, CUDA graphs


@pytest.mark.gpu
@needs_cuda
@requires_triton
@pytest.mark.parametrize("dtype", [BF16, F32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("vocab", [50288, 50277, 256000], ids=lambda v: f"V{v}")
def test_cross_entropy_gpu_realistic(dtype, vocab):
    rows = 2048 if vocab < 100000 else 256
    logits = leaf(make_logits(rows, vocab, dtype))
    target = make_target(rows, vocab, ignored=7)
    loss = cross_entropy(logits, target, backend="triton")
    (loss * 0.25).backward()
    loss_ref, grad_ref = reference_loss_and_grad(logits, target)
    assert_close(loss, loss_ref, F32, "loss")
    assert_close(logits.grad, grad_ref, dtype, "dlogits")


@pytest.mark.gpu
@needs_cuda
@requires_triton
def test_cross_entropy_gpu_int64_offsets():
    """43008 x 50288 bf16 logits (4.3 GB): N * V > 2**31, so the last rows' offsets need int64.
    Against torch's float32 cross-entropy, taken in chunks, and the gradient of the first and last
    rows written out (softmax - onehot) / count."""
    rows, vocab = 43008, 50288
    assert rows * vocab > 2**31
    logits = leaf(torch.randn(rows, vocab, device=DEVICE, dtype=BF16))
    target = make_target(rows, vocab, ignored=1000)
    loss = cross_entropy(logits, target, backend="triton")
    loss.backward()
    kept = target != -100
    count = kept.sum()
    with torch.no_grad():
        total = sum(
            F.cross_entropy(logits[i : i + 4096].float(), target[i : i + 4096], reduction="sum")
            for i in range(0, rows, 4096)
        )
        torch.testing.assert_close(loss, total / count, rtol=1e-5, atol=1e-5)
        for part in (slice(0, 64), slice(rows - 64, rows)):
            x, t = logits[part].float(), target[part]
            grad = torch.softmax(x, -1) - F.one_hot(t.clamp_min(0), vocab).float()
            grad = torch.where(kept[part, None], grad / count, 0.0)
            assert_close(logits.grad[part], grad, BF16, f"dlogits[{part}]")


@pytest.mark.gpu
@needs_cuda
@requires_triton
def test_cross_entropy_gpu_captures_in_a_cuda_graph():
    """No host sync forward or backward: the op captures in a CUDA graph, and a replay on new
    logits and targets gives the eager results."""
    rows, vocab = 512, 50288
    logits = leaf(make_logits(rows, vocab, BF16))
    target = make_target(rows, vocab, ignored=5)

    def step():
        logits.grad = None
        loss = cross_entropy(logits, target, backend="triton")
        (loss * 0.5).backward()
        return loss

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up: compile the kernels outside the capture
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()
        grad = logits.grad
    with torch.no_grad():
        logits.copy_(make_logits(rows, vocab, BF16))
    target.copy_(make_target(rows, vocab, ignored=3))
    graph.replay()
    loss_ref, grad_ref = reference_loss_and_grad(logits, target, scale=0.5)
    assert_close(loss, loss_ref, F32, "loss")
    assert_close(grad, grad_ref, BF16, "dlogits")
