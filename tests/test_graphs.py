"""CPU tests of what the CUDA-graph wrappers rely on (the graphs themselves: tests/test_gpu_path.py)."""

from __future__ import annotations

import pytest
import torch

from lit_matmamba import MatMambaLM
from lit_matmamba.graphs import GraphedForward, _Snapshot


def tiny_lm() -> MatMambaLM:
    torch.manual_seed(0)
    return MatMambaLM("lm-tiny")


def test_snapshot_holds_every_parameter_linear_weights_cast_and_refreshes_in_place():
    model = tiny_lm()
    snap = _Snapshot(model, torch.bfloat16)
    assert set(snap.tensors) == {n for n, _ in model.named_parameters(remove_duplicate=False)}
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for name, t in snap.tensors.items():
        expected = torch.bfloat16 if name.rsplit(".", 1)[0] in linears else torch.float32
        assert t.dtype == expected, name
    # The tied head is cast for its GEMM; the embedding keeps its float32 copy.
    assert snap.tensors["lm_head.weight"].dtype == torch.bfloat16
    assert snap.tensors["backbone.embedding.weight"].dtype == torch.float32

    def stale() -> int:
        return sum(not torch.equal(t, snap.sources[n].detach().to(t.dtype)) for n, t in snap.tensors.items())

    assert stale() == 0
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    torch.optim.AdamW(model.parameters(), lr=0.1, fused=True).step()
    assert stale() == len(snap.tensors)  # a snapshot: unchanged until refreshed
    pointers = [t.data_ptr() for t in snap.tensors.values()]
    snap.refresh()
    assert stale() == 0
    assert [t.data_ptr() for t in snap.tensors.values()] == pointers  # in place: graphs read these


def test_snapshot_of_a_bf16_model_copies_its_weights():
    """A linear weight already in the cast dtype is copied too: the snapshot never aliases a parameter."""
    model = tiny_lm().to(torch.bfloat16)
    snap = _Snapshot(model, torch.bfloat16)
    pointers = {p.data_ptr() for p in model.parameters()}
    assert not pointers & {t.data_ptr() for t in snap.tensors.values()}


def test_forward_on_the_snapshot_equals_autocast():
    """What GraphedForward(frozen_weights=True) captures: the model under autocast on the snapshot.
    Autocast casts to the same values, so the logits agree up to the order of bf16 products."""
    model = tiny_lm()
    snap = _Snapshot(model, torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (2, 24))

    def on_snapshot(width=None):
        return torch.func.functional_call(
            model, snap.tensors, (ids,), {"width": width}, tie_weights=False, strict=False
        )

    for width in (None, 32, [64, 16]):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            expected = model(ids, width=width)
            got = on_snapshot(width)
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the swap was temporary
    snap.tensors["lm_head.weight"].zero_()  # the head reads the snapshot, not the tied parameter
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.count_nonzero(on_snapshot()) == 0
        assert torch.count_nonzero(model(ids)) > 0


def test_frozen_weights_need_an_autocast_dtype():
    with pytest.raises(ValueError, match="autocast_dtype"):
        GraphedForward(
            tiny_lm(), torch.zeros(1, 4, dtype=torch.long), autocast_dtype=None, frozen_weights=True
        )
