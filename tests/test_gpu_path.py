"""The GPU path of the nested mixer (Triton kernels + mamba-ssm's SSD) against the reference path.

Runs on a CUDA machine with mamba-ssm installed (see README, GPU install); skipped elsewhere.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from lit_matmamba import MatMambaConfig, MatMambaLM

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is None, reason="needs mamba-ssm (GPU install)"),
]

WIDTHS = [None, 128, 64, 32, [256, 32, 128, 64]]
IDS = ["full", "w128", "w64", "w32", "mixnmatch"]


def pair(dtype: torch.dtype):
    cfg = dict(d_model=256, n_layer=4, vocab_size=1000, d_state=64, headdim=16, chunk_size=64)
    torch.manual_seed(0)
    fast = MatMambaLM(MatMambaConfig(**cfg, backend="triton")).cuda()
    ref = MatMambaLM(MatMambaConfig(**cfg, backend="reference")).cuda()
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@pytest.mark.parametrize("width", WIDTHS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_path_matches_reference(width, dtype):
    fast, ref = pair(dtype)
    ids = torch.randint(0, 1000, (2, 300), device="cuda")  # 300: not a multiple of the chunk size
    tol = 2e-3 if dtype == torch.float32 else 2e-2
    losses = []
    for model in (fast, ref):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model.loss(ids, width)
        loss.backward()
        losses.append(loss)
    assert abs(losses[0].item() - losses[1].item()) < tol * abs(losses[1].item())
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        assert rel(fast(ids, width), ref(ids, width)) < tol
    ref_params = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        g, g_ref = p.grad, ref_params[name].grad
        if g_ref is None or g_ref.norm() == 0:
            assert g is None or g.norm() == 0, name
            continue
        assert rel(g, g_ref) < 5 * tol, (name, rel(g, g_ref))


@pytest.mark.parametrize("width", WIDTHS, ids=IDS)
def test_gpu_decode_matches_forward(width):
    fast, _ = pair(torch.float32)
    ids = torch.randint(0, 1000, (2, 70), device="cuda")
    with torch.no_grad():
        full = fast(ids, width)
        cache = fast.allocate_cache(2, width)
        pre = fast(ids[:, :40], width, cache)
        steps = torch.stack([fast.step(ids[:, t], cache) for t in range(40, 70)], 1)
    assert rel(pre, full[:, :40]) < 1e-3 and rel(steps, full[:, 40:]) < 1e-3


@pytest.mark.parametrize("width", [None, 128], ids=["full", "w128"])
def test_export_loads_in_stock_mamba_ssm(width, tmp_path):
    """A uniform sub-model exported with `save_mamba_ssm` loads in stock `MambaLMHeadModel` and
    gives the nested model's logits. (mamba-ssm 2.3.2 builds Mamba2 layers only for a whole-number
    expand: widths D and D/2 of an expand-2 model.)"""
    import sys
    import types

    from lit_matmamba.kernels.mamba_ssm_compat import get_mamba_chunk_scan_combined
    from lit_matmamba.models.interop import save_mamba_ssm

    get_mamba_chunk_scan_combined()  # imports mamba-ssm through the shim
    sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))  # Mamba-1 only
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    fast, _ = pair(torch.float32)
    path = save_mamba_ssm(fast, tmp_path / "export", width)
    stock = MambaLMHeadModel.from_pretrained(str(path), device="cuda", dtype=torch.float32)
    for layer in stock.backbone.layers:  # the fused path needs causal-conv1d, absent here
        layer.mixer.use_mem_eff_path = False
    ids = torch.randint(0, 1000, (2, 100), device="cuda")
    with torch.no_grad():
        assert rel(stock(ids).logits, fast(ids, width)) < 2e-3


@pytest.mark.parametrize("width", [None, 64, [256, 32, 128, 64]], ids=["full", "w64", "mixnmatch"])
def test_graphed_forward_equals_eager(width):
    from lit_matmamba.graphs import GraphedForward

    fast, _ = pair(torch.float32)
    ids = torch.randint(0, 1000, (2, 128), device="cuda")
    graphed = GraphedForward(fast, ids, width=width)
    other = torch.randint(0, 1000, (2, 128), device="cuda")  # new data through the static buffer
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        eager = fast(other, width=width)
    assert rel(graphed(other), eager) < 1e-3


def test_graphed_forward_with_frozen_weights_serves_them_until_refresh():
    from lit_matmamba.graphs import GraphedForward

    fast, _ = pair(torch.float32)
    ids = torch.randint(0, 1000, (2, 128), device="cuda")

    def eager():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            return fast(ids, width=64)

    graphed = GraphedForward(fast, ids, width=64, frozen_weights=True)
    before = eager()
    assert rel(graphed(ids), before) < 1e-3
    for p in fast.parameters():
        p.grad = torch.randn_like(p)
    torch.optim.AdamW(fast.parameters(), lr=1e-2, fused=True).step()
    after = eager()
    assert rel(after, before) > 1e-2  # the step changed the model
    assert rel(graphed(ids), before) < 1e-3  # frozen: the graph still serves the captured weights
    graphed.refresh()
    assert rel(graphed(ids), after) < 1e-3


def test_graphed_joint_step_equals_the_eager_step():
    """Losses, gradient norm and every gradient of the replayed step equal plain autograd's
    (the graph uses direct weight gradients), on two different batches: the second replay
    rewrites the gradients instead of adding to the first's. Capture changes no weight."""
    from lit_matmamba.training.joint import capture_joint_step

    fast, _ = pair(torch.float32)
    eager = copy.deepcopy(fast)
    widths, weights = [256, 128, 64, 32], [0.4, 0.3, 0.2, 0.1]
    example = torch.randint(0, 1000, (2, 129), device="cuda")
    step = capture_joint_step(fast.loss, example, widths, weights, fast.parameters())
    assert all(torch.equal(a, b) for a, b in zip(fast.parameters(), eager.parameters()))
    for seed in (1, 2):
        batch = torch.randint(
            0, 1000, (2, 129), device="cuda", generator=torch.Generator("cuda").manual_seed(seed)
        )
        losses, norm = step(batch)
        eager.zero_grad(set_to_none=True)
        expected = []
        for width, weight in zip(widths, weights):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = eager.loss(batch, width)
            (loss * weight).backward()
            expected.append(loss.detach())
        expected_norm = torch.nn.utils.clip_grad_norm_(eager.parameters(), 1.0)
        assert rel(losses, torch.stack(expected)) < 1e-3
        assert rel(norm, expected_norm) < 1e-2
        for (name, p), q in zip(fast.named_parameters(), eager.parameters()):
            assert rel(p.grad, q.grad) < 2e-2, name


def test_lightning_cuda_graphs_train_like_the_eager_step(tmp_path):
    """`LanguageModeling(cuda_graphs=True)` under bf16-mixed: the same per-step losses, step count
    and final weights as the eager step; the short last batch runs eagerly with a warning."""
    import lightning as L
    from torch.utils.data import DataLoader

    from lit_matmamba.training import LanguageModeling

    data = torch.randint(0, 1000, (20, 65), generator=torch.Generator().manual_seed(0))

    def fit(cuda_graphs: bool):
        torch.manual_seed(0)
        model = MatMambaLM(MatMambaConfig(d_model=256, n_layer=4, vocab_size=1000, d_state=64, headdim=16,
                                          chunk_size=64, backend="triton"))  # fmt: skip
        module = LanguageModeling(model, cuda_graphs=cuda_graphs)
        losses = []

        class Record(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                losses.append(float(trainer.callback_metrics["train/loss"]))

        trainer = L.Trainer(
            accelerator="gpu", devices=1, precision="bf16-mixed", max_epochs=1, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=tmp_path, callbacks=[Record()], limit_val_batches=0,
        )  # fmt: skip
        trainer.fit(module, DataLoader(data, batch_size=6))  # batches of 6, 6, 6 and 2
        return losses, trainer.global_step, model

    eager_losses, eager_steps, eager_model = fit(False)
    with pytest.warns(UserWarning, match="another shape"):
        graph_losses, graph_steps, graph_model = fit(True)
    assert graph_steps == eager_steps == 4
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(eager_losses), rtol=1e-2, atol=1e-3)
    for (name, p), q in zip(graph_model.named_parameters(), eager_model.parameters()):
        assert rel(p, q) < 1e-2, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_direct_weight_grads_match_autograd_on_the_gpu(dtype):
    """A joint step's gradients with direct weight gradients (in_proj's two row blocks in one node,
    weight gradients added inside the GEMMs, float32 accumulation of bf16 products) against plain
    autograd, on the GPU path (fused core included)."""
    from lit_matmamba.models import direct_weight_grads

    fast, _ = pair(dtype)
    ids = torch.randint(0, 1000, (2, 300), device="cuda")
    grads = []
    for direct in (False, True):
        fast.zero_grad(set_to_none=True)
        for width in fast.config.default_granularities():
            autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
            with autocast, direct_weight_grads(direct):
                loss = fast.loss(ids, width) / 4
            loss.backward()
        grads.append({name: p.grad.clone() for name, p in fast.named_parameters()})
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    for name, g_ref in grads[0].items():
        assert rel(grads[1][name], g_ref) < tol, (name, rel(grads[1][name], g_ref))
