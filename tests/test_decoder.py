"""The decoding step: its GPU kernels against their references (on CPU under the Triton
interpreter), `GraphedDecoder`'s rows eagerly on the CPU, and on a GPU (marked `gpu`) the graphed
steps against the eager ones token for token at every width and batch bucket."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from kernel_testing import DEVICE, mamba_ssm_kernels, requires_triton  # noqa: F401  (a fixture)

from lit_matmamba import MatMambaConfig, MatMambaLM
from lit_matmamba.graphs import GraphedDecoder
from lit_matmamba.kernels import causal_conv1d_step, ssd_step
from lit_matmamba.kernels.causal_conv1d import causal_conv1d_step_ref
from lit_matmamba.kernels.ssd import ssd_step_ref

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def on_gpu(test):
    """Marked `gpu`; skipped without a CUDA GPU and mamba-ssm."""
    test = pytest.mark.skipif(
        importlib.util.find_spec("mamba_ssm") is None, reason="needs mamba-ssm (GPU install)"
    )(test)
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


# The step's kernels -----------------------------------------------------------------------------
@requires_triton
@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("k", [4, 2])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_conv_step_kernel_updates_the_state_in_place_as_the_reference(dtype, k, bias):
    torch.manual_seed(0)
    B, C, full = 3, 300, 420  # C spans two channel blocks; weight and x are prefix views
    x = torch.randn(B, full, device=DEVICE, dtype=dtype)[:, :C]
    weight = torch.randn(full, k, device=DEVICE, dtype=dtype)[:C]
    b = torch.randn(full, device=DEVICE, dtype=dtype)[:C] if bias else None
    state = torch.randn(B, C, k - 1, device=DEVICE, dtype=dtype)
    y_ref, state_ref = causal_conv1d_step_ref(x, state.clone(), weight, b)
    y, new = causal_conv1d_step(x, state, weight, b, backend="triton")
    assert new is state  # written in place
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(state, state_ref)  # a shift and a copy: exact


@requires_triton
@pytest.mark.usefixtures("mamba_ssm_kernels")
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["fp32-state", "bf16-state"])
@pytest.mark.parametrize("ngroups", [1, 2])
def test_ssd_step_kernel_is_the_reference(state_dtype, ngroups):
    """mamba-ssm's selective_state_update, fed per-head A, dt, D and dt_bias (broadcast over the
    head dim), on the mixer's layout: x, B and C are views into one projection."""
    torch.manual_seed(0)
    b, k, P, N = 2, 4, 8, 16
    xbc = torch.randn(b, 2 * ngroups * N + k * P, device=DEVICE)
    Bm = xbc[:, : ngroups * N].unflatten(-1, (ngroups, N))
    Cm = xbc[:, ngroups * N : 2 * ngroups * N].unflatten(-1, (ngroups, N))
    x = xbc[:, 2 * ngroups * N :].unflatten(-1, (k, P))
    dt = torch.randn(b, k + 3, device=DEVICE)[:, :k]
    A = -torch.rand(k, device=DEVICE) - 0.5
    D, dt_bias = torch.randn(k, device=DEVICE), torch.randn(k, device=DEVICE)
    state = torch.randn(b, k, P, N, device=DEVICE).to(state_dtype)
    y_ref, state_ref = ssd_step_ref(x, dt, A, Bm, Cm, state.clone(), D, dt_bias)
    y, new = ssd_step(x, dt, A, Bm, Cm, state, D, dt_bias, backend="triton")
    assert new is state
    tol = TOL[state_dtype]
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(state.float(), state_ref.float(), rtol=tol, atol=tol)


# GraphedDecoder, eager ------------------------------------------------------------------------
def tiny(dtype=torch.float64) -> MatMambaLM:
    torch.manual_seed(0)
    cfg = MatMambaConfig(d_model=32, n_layer=3, vocab_size=320, d_state=8, headdim=8, chunk_size=8)
    return MatMambaLM(cfg).to(dtype).eval()


@pytest.mark.parametrize("width", [None, 8, [32, 4, 16]], ids=["full", "w8", "mixnmatch"])
def test_decoder_rows_continue_their_sequences(width):
    """Rows loaded into slots, stepped together, one moved to another slot: each continues its own
    sequence as a cache of its own does (up to the order of sums in a batch of another size)."""
    model = tiny()
    dec = GraphedDecoder(model, width, batch_size=4)
    assert not dec.cuda_graphs and dec.buckets == [1, 2, 4]
    prompts = [torch.tensor([5, 9, 2, 7]), torch.tensor([11, 3])]
    own = []
    with torch.no_grad():
        for p in prompts:
            cache = model.allocate_cache(1, width)
            model.prefill([p], cache)
            own.append(cache)
        cache = model.allocate_cache(2, width)
        model.prefill(prompts, cache)
        dec.load(cache, start=1)  # rows 1 and 2; row 0 holds nothing
        dec.move(1, 0)
        dec.move(2, 1)
        for token in ([4, 8], [1, 30], [7, 7]):
            logits = dec.step(torch.tensor(token))
            for i, c in enumerate(own):
                expected = model.step(torch.tensor(token[i : i + 1]), c)
                torch.testing.assert_close(logits[i : i + 1], expected)  # float64: up to the order of sums
        dec.move(1, 0)  # the second sequence alone, in slot 0
        torch.testing.assert_close(dec.step(torch.tensor([3])), model.step(torch.tensor([3]), own[1]))


def test_decoder_refuses_what_it_cannot_hold():
    model = tiny()
    dec = GraphedDecoder(model, 8, batch_size=2)
    with pytest.raises(ValueError, match="a step takes 1 to 2"):
        dec.step(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="widths"):
        dec.load(model.allocate_cache(1, 16))
    with pytest.raises(ValueError, match="do not fit"):
        dec.load(model.allocate_cache(2, 8), start=1)
    with pytest.raises(ValueError, match="CUDA graphs need"):
        GraphedDecoder(model, 8, 2, cuda_graphs=True)
    with pytest.raises(ValueError, match="decoder runs widths"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 2, 16, decoder=dec)


# On the GPU: graphed against eager --------------------------------------------------------------
def gpu_model(dtype: torch.dtype) -> MatMambaLM:
    torch.manual_seed(0)
    cfg = MatMambaConfig(d_model=256, n_layer=4, vocab_size=1000, d_state=64, headdim=16, chunk_size=64)
    return MatMambaLM(cfg).cuda().to(dtype).eval()


GPU_WIDTHS = [None, 128, 64, 32, [256, 32, 128, 64]]
GPU_IDS = ["full", "w128", "w64", "w32", "mixnmatch"]


@on_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("width", GPU_WIDTHS, ids=GPU_IDS)
def test_graphed_decoding_equals_eager_token_for_token(width, dtype):
    """Every bucket of a graphed decoder against an eager decoder with the same state dtype: the
    eager one decodes greedily for 40 steps from prompts of different lengths, the graphed one is
    fed the same tokens; their logits agree at every step, and so do their choices (the same
    kernels on the same shapes; the tolerance is there only for a GEMM that might pick another
    algorithm inside a capture, and then a choice may differ only between near-equal logits)."""
    model = gpu_model(dtype)
    ssm_dtype = dtype if dtype == torch.bfloat16 else None
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    graphed = GraphedDecoder(model, width, 8, ssm_dtype=ssm_dtype)
    eager = GraphedDecoder(model, width, 8, ssm_dtype=ssm_dtype, cuda_graphs=False)
    assert graphed.cuda_graphs and graphed.buckets == [1, 2, 4, 8]

    def decode(decoder, prompts, forced=None):
        cache = model.allocate_cache(len(prompts), width)
        logits = model.prefill(prompts, cache)
        decoder.load(cache)
        steps = []
        for t in range(40):
            logits = logits[:, :1000].float()
            token = logits.argmax(-1) if forced is None else forced[t][0]
            steps.append((token, logits))
            logits = decoder.step(token).clone()
        return steps

    for n in graphed.buckets:
        prompts = [torch.randint(0, 1000, (5 + 3 * i,), device="cuda") for i in range(n)]
        reference = decode(eager, prompts)
        for (token, expected), (_, got) in zip(reference, decode(graphed, prompts, forced=reference)):
            torch.testing.assert_close(
                got, expected, rtol=tol, atol=tol, msg=lambda m, n=n: f"bucket {n}: {m}"
            )
            choice = got.argmax(-1)
            gap = expected.gather(1, token[:, None]) - expected.gather(1, choice[:, None])  # (n, 1)
            assert bool((gap[choice != token] <= tol).all()), n


@on_gpu
@pytest.mark.parametrize("width", GPU_WIDTHS, ids=GPU_IDS)
def test_generate_with_and_without_graphs(width):
    model = gpu_model(torch.float32)
    prompts = [torch.randint(0, 1000, (n,), device="cuda") for n in (7, 12, 12)]
    graphed = model.generate(prompts, 30, width, temperature=0)
    eager = model.generate(prompts, 30, width, temperature=0, cuda_graphs=False)
    assert all(torch.equal(a, b) for a, b in zip(graphed, eager))


@on_gpu
@pytest.mark.parametrize("ssm_dtype", [torch.float32, torch.bfloat16], ids=["fp32-state", "bf16-state"])
def test_gpu_step_kernels_against_the_reference_backend(ssm_dtype):
    """The decoding step's GPU kernels (conv step, selective_state_update, gated norm) against the
    reference ops, 30 steps on the same inputs."""
    fast = gpu_model(torch.float32)
    ref = MatMambaLM(fast.config.replace(backend="reference")).cuda().eval()
    ref.load_state_dict(fast.state_dict())
    ids = torch.randint(0, 1000, (3, 40), device="cuda")
    outs = []
    with torch.no_grad():
        for model in (fast, ref):
            cache = model.allocate_cache(3, 64, ssm_dtype=ssm_dtype)
            model.prefill(list(ids[:, :10]), cache)
            outs.append(torch.stack([model.step(ids[:, t], cache) for t in range(10, 40)], 1))
    tol = 1e-3 if ssm_dtype == torch.float32 else 3e-2
    err = float((outs[0] - outs[1]).norm() / outs[1].norm())
    assert err < tol, err
