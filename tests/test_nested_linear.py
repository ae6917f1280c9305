"""`nested_linear` and `direct_weight_grads`: the width-proportional weight gradient equals autograd's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lit_matmamba import MatMambaConfig, MatMambaLM
from lit_matmamba.models import direct_weight_grads, nested_linear


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


@pytest.mark.parametrize(
    "rows, cols", [(slice(None), None), (slice(0, 5), None), (slice(3, 9), None), (slice(None), 4)]
)
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_direct_grads_equal_autograd_on_a_block(rows, cols, bias):
    torch.manual_seed(0)
    w, b = torch.randn(11, 7, dtype=torch.float64), torch.randn(11, dtype=torch.float64)
    x = torch.randn(3, 2, 7 if cols is None else cols, dtype=torch.float64)
    dy_shape = F.linear(x, w[rows, :cols]).shape
    dy = torch.randn(dy_shape, dtype=torch.float64)

    def run(direct: bool, pre_grad: bool):
        w_, b_, x_ = leaf(w), leaf(b) if bias else None, leaf(x)
        if pre_grad:  # an existing gradient (another width, an earlier micro-batch) is added to
            w_.grad = torch.ones_like(w_)
            if bias:
                b_.grad = torch.ones_like(b_)
        with direct_weight_grads(direct):
            y = nested_linear(x_, w_, b_, rows=rows, cols=cols)
        y.backward(dy)
        return y, x_.grad, w_.grad, None if b_ is None else b_.grad

    for pre_grad in (False, True):
        expected, got = run(False, pre_grad), run(True, pre_grad)
        for name, e, g in zip(("y", "dx", "dweight", "dbias"), expected, got):
            if e is None:
                assert g is None
                continue
            torch.testing.assert_close(g, e, msg=lambda m, name=name: f"{name}: {m}")
    # The gradient lands in the block only.
    _, _, dw, _ = run(True, False)
    outside = torch.ones_like(dw, dtype=torch.bool)
    outside[rows, :cols] = False
    assert (dw[outside] == 0).all() and dw[~outside].abs().max() > 0


@pytest.mark.parametrize("used", ["both", "first", "second"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_direct_grads_of_several_row_blocks_equal_autograd(used, bias):
    """Two row blocks from one x (the in_proj of a sub-mixer), one node: dx sums both blocks'
    gradients; a block whose output is unused contributes nothing."""
    torch.manual_seed(0)
    w, b = torch.randn(11, 7, dtype=torch.float64), torch.randn(11, dtype=torch.float64)
    x = torch.randn(3, 2, 7, dtype=torch.float64)
    rows = (slice(0, 3), slice(5, 9))

    def run(direct: bool):
        w_, b_, x_ = leaf(w), leaf(b) if bias else None, leaf(x)
        with direct_weight_grads(direct):
            y1, y2 = nested_linear(x_, w_, b_, rows=rows)
        loss = {"both": y1.sum() + (y2 * y2).sum(), "first": y1.sum(), "second": (y2 * y2).sum()}[used]
        loss.backward()
        return x_.grad, w_.grad, None if b_ is None else b_.grad

    for name, e, g in zip(("dx", "dweight", "dbias"), run(False), run(True)):
        if e is None:
            assert g is None
            continue
        torch.testing.assert_close(g, e, msg=lambda m, name=name: f"{name}: {m}")


def test_direct_grads_off_by_default_and_without_grad_mode():
    w = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(2, 3)
    y = nested_linear(x, w, None, rows=slice(0, 2))
    assert y.grad_fn.name() != "_DirectGradLinearBackward"  # plain autograd unless asked
    with direct_weight_grads():
        assert nested_linear(x, w, None, rows=slice(0, 2)).grad_fn.name() == "_DirectGradLinearBackward"
        with torch.no_grad():
            assert nested_linear(x, w, None, rows=slice(0, 2)).grad_fn is None


def joint_grads(model: MatMambaLM, ids: torch.Tensor, widths: list, direct: bool, autocast: bool):
    model.zero_grad(set_to_none=True)
    losses = []
    for width in widths:
        with direct_weight_grads(direct), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model.loss(ids, width)
        (loss / len(widths)).backward()
        losses.append(loss.detach())
    return torch.stack(losses), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("proj_bias", [False, True], ids=["no-bias", "bias"])
def test_joint_step_gradients_equal_with_direct_grads(proj_bias):
    """Every granularity and a Mix'n'Match setting backpropagated in turn into the same `.grad`,
    as the training step does: identical gradients for every parameter (fp32)."""
    torch.manual_seed(0)
    cfg = MatMambaConfig(
        d_model=32, n_layer=2, vocab_size=61, d_state=8, headdim=8, chunk_size=8, proj_bias=proj_bias
    )
    model = MatMambaLM(cfg)
    ids = torch.randint(0, 61, (2, 17))
    widths = [*cfg.default_granularities(), [16, 32]]
    losses, expected = joint_grads(model, ids, widths, direct=False, autocast=False)
    losses_d, got = joint_grads(model, ids, widths, direct=True, autocast=False)
    torch.testing.assert_close(losses_d, losses)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=lambda m, name=name: f"{name}: {m}")


def test_joint_step_gradients_close_under_bf16_autocast():
    """Under autocast both paths multiply in bf16; only rounding order may differ."""
    torch.manual_seed(0)
    model = MatMambaLM("lm-tiny")
    ids = torch.randint(0, model.config.vocab_size, (2, 17))
    widths = list(model.config.default_granularities())
    losses, expected = joint_grads(model, ids, widths, direct=False, autocast=True)
    losses_d, got = joint_grads(model, ids, widths, direct=True, autocast=True)
    torch.testing.assert_close(losses_d, losses, rtol=1e-2, atol=1e-2)
    for name in expected:
        e, g = expected[name], got[name]
        assert ((g - e).norm() / e.norm().clamp_min(1e-12)).item() < 2e-2, name


@pytest.mark.parametrize("used", ["both", "head", "last"])
def test_split_last_gradient_equals_autograd(used):
    """The (z, dt) split's one-buffer backward equals autograd's backward of the two views,
    also when only one of them gets a gradient."""
    from lit_matmamba.models.mixer import split_last

    t = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    d_head, d_last = torch.randn(2, 3, 4, 5, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)

    def run(split):
        x = leaf(t)
        head, last = split(x)
        assert torch.equal(head, t[..., :5]) and torch.equal(last, t[..., 5])
        outs = {"both": [(head, d_head), (last, d_last)], "head": [(head, d_head)], "last": [(last, d_last)]}[
            used
        ]
        torch.autograd.backward([o for o, _ in outs], [g for _, g in outs])
        return x.grad

    expected = run(lambda x: (x[..., :5], x[..., 5]))
    torch.testing.assert_close(run(lambda x: split_last(x, 5)), expected, rtol=0, atol=0)


def tiny_lm(tie: bool = True, head: torch.nn.Module | None = None) -> MatMambaLM:
    torch.manual_seed(0)
    cfg = MatMambaConfig(d_model=16, n_layer=2, vocab_size=29, d_state=8, headdim=8, chunk_size=8)
    cfg.tie_embeddings = tie
    return MatMambaLM(cfg, head=head)


def test_lm_head_goes_through_nested_linear_only_with_direct_grads():
    model = tiny_lm()
    ids = torch.randint(0, 29, (2, 5))
    assert model(ids).grad_fn.name() != "_DirectGradLinearBackward"
    with direct_weight_grads():
        assert model(ids).grad_fn.name() == "_DirectGradLinearBackward"
        with torch.no_grad():  # inference: the plain head
            assert model(ids).grad_fn is None
            cache = model.allocate_cache(2, 8)
            torch.testing.assert_close(model(ids, 8, cache)[:, -1], model(ids, 8)[:, -1])
            model.step(ids[:, 0], cache)
        model.lm_head.weight.requires_grad_(False)  # a frozen head: plain autograd
        assert model(ids).grad_fn.name() != "_DirectGradLinearBackward"


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("widths", [[8], [16], [16, 8], [[8, 16], 16]], ids=str)
def test_lm_head_gradients_equal_with_direct_grads(tie, widths):
    """The head's weight gradient, added into `.grad` by the backward, equals autograd's; tied, it
    sums with the embedding's (autograd's) gradient, over several widths' backward passes (fp32)."""
    model = tiny_lm(tie)
    assert (model.lm_head.weight is model.backbone.embedding.weight) == tie
    ids = torch.randint(0, 29, (2, 9))
    losses, expected = joint_grads(model, ids, widths, direct=False, autocast=False)
    losses_d, got = joint_grads(model, ids, widths, direct=True, autocast=False)
    torch.testing.assert_close(losses_d, losses, rtol=0, atol=0)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("first", ["embedding", "plain", "zeros"])
def test_tied_head_gradient_adds_to_an_existing_grad(first):
    """Tied head and embedding: whichever gradient arrives first creates `.grad` and the other adds
    to it. `first`: a backward through the embedding only (autograd creates `.grad`), a plain
    backward of the loss, or a zero `.grad` set beforehand, which must be kept, not replaced."""
    model = tiny_lm(tie=True)
    weight = model.lm_head.weight
    ids = torch.randint(0, 29, (2, 9))

    def run(direct: bool) -> dict:
        model.zero_grad(set_to_none=True)
        if first == "embedding":
            (model.backbone.embedding(ids) ** 2).sum().backward()
        elif first == "plain":
            model.loss(ids, 8).backward()
        else:
            weight.grad = torch.zeros_like(weight)
        grad = weight.grad
        for width in (16, 8):
            with direct_weight_grads(direct):
                loss = model.loss(ids, width)
            loss.backward()
            assert weight.grad is grad  # accumulated in place
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    expected, got = run(False), run(True)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=lambda m, name=name: f"{name}: {m}")


class ScaledLinear(torch.nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


@pytest.mark.parametrize("kind", ["sequential", "subclass", "hooked", "bias"])
def test_custom_lm_head_keeps_its_own_forward(kind):
    """Only a plain `nn.Linear` head goes through `nested_linear`; a custom module (or one with a
    hook) runs its forward. A plain `nn.Linear` with a bias goes through it, bias gradient included."""
    calls = []
    if kind == "sequential":
        head = torch.nn.Sequential(torch.nn.Linear(16, 32, bias=False))
    elif kind == "subclass":
        head = ScaledLinear(16, 32, bias=False)
    else:
        head = torch.nn.Linear(16, 32, bias=kind == "bias")
    if kind != "bias":
        head.register_forward_hook(lambda *args: calls.append(1))
    model = tiny_lm(tie=False, head=head)
    ids = torch.randint(0, 29, (2, 9))
    with direct_weight_grads():
        logits = model(ids)
    routed = logits.grad_fn.name() == "_DirectGradLinearBackward"
    assert routed == (kind == "bias") and len(calls) == (kind != "bias")
    if kind == "subclass":
        with torch.no_grad():
            h = model.forward_features(ids)
            torch.testing.assert_close(logits, 2 * torch.nn.functional.linear(h, head.weight))
    _, expected = joint_grads(model, ids, [16, 8], direct=False, autocast=False)
    _, got = joint_grads(model, ids, [16, 8], direct=True, autocast=False)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_lm_head_gradients_close_under_bf16_autocast(tie):
    """Under autocast the direct head multiplies in bf16 like autocast's linear (float32 `.grad`)."""
    model = tiny_lm(tie)
    ids = torch.randint(0, 29, (2, 9))
    losses, expected = joint_grads(model, ids, [16, 8], direct=False, autocast=True)
    losses_d, got = joint_grads(model, ids, [16, 8], direct=True, autocast=True)
    torch.testing.assert_close(losses_d, losses, rtol=1e-2, atol=1e-2)
    for name in expected:
        e, g = expected[name], got[name]
        assert g.dtype == torch.float32
        assert ((g - e).norm() / e.norm().clamp_min(1e-12)).item() < 2e-2, name
