"""The training recipe's options: which widths a step trains, loss weights, self-distillation.

Each option must change what the joint step computes in the intended way, and the default must
compute exactly what the paper's step computed before the options existed.
"""

from __future__ import annotations

import ast
import copy
import importlib.util

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from test_training import VOCAB, TokenData, params, sgd, tiny_lm, trainer

from lit_matmamba import MatMambaLM, MatMambaVision
from lit_matmamba.models import MatMambaConfig
from lit_matmamba.models.nested_linear import direct_weight_grads
from lit_matmamba.training import ImageClassification, LanguageModeling
from lit_matmamba.training.joint import (
    Distillation,
    WidthPolicy,
    WidthSampling,
    distillation_loss,
    joint_backward,
)

CONFIG = MatMambaConfig.from_name("lm-tiny", vocab_size=VOCAB)  # widths 4..64 in steps of 4
GRANULARITIES = [64, 32, 16, 8]


class StepRecorder(L.Callback):
    """Records each training step's widths and returned loss."""

    def __init__(self):
        self.widths, self.losses = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.widths.append(pl_module.step_widths)
        self.losses.append((outputs["loss"] if isinstance(outputs, dict) else outputs).detach().clone())


# The default: the paper's step, bit for bit ------------------------------------------------------
@pytest.mark.parametrize("direct", [False, True], ids=["autograd-grads", "direct-grads"])
@pytest.mark.parametrize("weights", [None, [0.4, 0.3, 0.2, 0.1]], ids=["equal", "weighted"])
def test_default_recipe_is_the_papers_step_bit_for_bit(tmp_path, weights, direct):
    """Default options: every granularity in order, weights 1/n (or `loss_weights`), each width's
    `loss * weight` back-propagated in turn; the same losses and updates to the last bit as that
    loop written out (the step as it was before the recipe options)."""
    data = TokenData()
    module = LanguageModeling(
        tiny_lm(), loss_weights=weights, optimizer=sgd, gradient_clip_val=None, direct_weight_grads=direct
    )
    reference = copy.deepcopy(module.model)
    before = params(module.model)
    recorder = StepRecorder()
    trainer(tmp_path, max_steps=1, callbacks=[recorder]).fit(module, data)
    assert recorder.widths == [GRANULARITIES]

    batch = next(iter(data.train_dataloader()))
    ws = weights or [1.0 / 4] * 4
    losses = []
    for width, weight in zip(GRANULARITIES, ws):
        with direct_weight_grads(direct):
            loss = reference.loss(batch, width)
            (loss * weight).backward()
        losses.append(loss.detach())
    assert torch.equal(recorder.losses[0], (torch.stack(losses) * torch.tensor(ws)).sum())
    for name, p in module.model.named_parameters():
        assert torch.equal(p.detach(), before[name] - reference.get_parameter(name).grad), name


# Which widths a step trains ----------------------------------------------------------------------
SANDWICHES = {
    "uniform-range": WidthSampling(rule="sandwich", num_sampled=2),
    "per-layer-range": WidthSampling(rule="sandwich", num_sampled=3, per_layer=True),
    "uniform-granularities": WidthSampling(rule="sandwich", num_sampled=2, sample_from="granularities"),
    "per-layer-granularities": WidthSampling(
        rule="sandwich", num_sampled=2, per_layer=True, sample_from="granularities"
    ),
}


@pytest.mark.parametrize("sampling", SANDWICHES.values(), ids=SANDWICHES.keys())
def test_sandwich_step_always_trains_the_largest_and_smallest_width(sampling):
    policy = WidthPolicy(CONFIG, GRANULARITIES, sampling=sampling)
    width_step = CONFIG.width_step
    allowed = set(range(8, 65, width_step)) if sampling.sample_from == "range" else set(GRANULARITIES)
    drawn = set()
    for step in range(200):
        widths, weights = policy(step)
        assert widths[:2] == [64, 8] and len(widths) == 2 + sampling.num_sampled
        assert weights == [1.0 / len(widths)] * len(widths)
        for w in widths[2:]:
            layer_widths = CONFIG.resolve(w)  # a valid width
            assert set(layer_widths) <= allowed
            drawn.add(tuple(layer_widths))
        if not sampling.per_layer:  # distinct widths, none of them an end
            assert len(set(widths)) == len(widths)
        assert policy(step) == (widths, weights)  # a function of the step (and seed) only
    assert len(drawn) >= min(len(allowed) - 2, 4)  # it does sample, not repeat one width


def test_sampled_widths_depend_on_the_seed_and_step_only(monkeypatch):
    """Every data-parallel rank computes the same draw from (seed, step); the seed defaults to
    Lightning's (`PL_GLOBAL_SEED`)."""
    sampling = WidthSampling(rule="sandwich", num_sampled=2, per_layer=True)
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    from_env = [WidthPolicy(CONFIG, GRANULARITIES, sampling=sampling)(s)[0] for s in range(20)]
    explicit = WidthSampling(rule="sandwich", num_sampled=2, per_layer=True, seed=7)
    assert from_env == [WidthPolicy(CONFIG, GRANULARITIES, sampling=explicit)(s)[0] for s in range(20)]
    monkeypatch.setenv("PL_GLOBAL_SEED", "8")
    assert from_env != [WidthPolicy(CONFIG, GRANULARITIES, sampling=sampling)(s)[0] for s in range(20)]
    assert len({str(w) for w in from_env}) > 1  # different steps, different widths


def test_all_granularities_plus_random_mix_n_match():
    policy = WidthPolicy(
        CONFIG,
        GRANULARITIES,
        sampling=WidthSampling(num_sampled=1, per_layer=True, sample_from="granularities"),
    )
    assert not policy.fixed
    for step in range(50):
        widths, weights = policy(step)
        assert widths[:4] == GRANULARITIES and len(widths[4]) == CONFIG.n_layer
        assert set(widths[4]) <= set(GRANULARITIES) and weights == [0.2] * 5


def test_loss_weights_follow_the_width_a_step_trains():
    """A granularity keeps its weight whenever it is trained, sampled or not; another sampled
    width takes `sampled_weight`."""
    policy = WidthPolicy(
        CONFIG,
        GRANULARITIES,
        loss_weights=[0.4, 0.3, 0.2, 0.1],
        sampling=WidthSampling(rule="sandwich", num_sampled=2, sampled_weight=0.05),
    )
    seen = set()
    for step in range(100):
        widths, weights = policy(step)
        expected = {64: 0.4, 32: 0.3, 16: 0.2, 8: 0.1}
        assert weights == [expected.get(w, 0.05) for w in widths]
        seen.update(widths)
    assert {32, 16} <= seen  # the middle granularities were drawn, and took their own weights


@pytest.mark.parametrize("direct", [False, True], ids=["autograd-grads", "direct-grads"])
def test_loss_weights_scale_each_widths_gradient(tmp_path, direct):
    """Weight 3 on one granularity and 0 on the others: the step's gradient is 3 x that width's
    own gradient, for each granularity in turn."""
    data = TokenData()
    batch = next(iter(data.train_dataloader()))
    for i, width in enumerate(GRANULARITIES):
        weights = [0.0] * 4
        weights[i] = 3.0
        module = LanguageModeling(
            tiny_lm(), loss_weights=weights, optimizer=sgd, gradient_clip_val=None, direct_weight_grads=direct
        )
        reference = copy.deepcopy(module.model)
        before = params(module.model)
        trainer(tmp_path, max_steps=1).fit(module, data)
        reference.loss(batch, width).backward()
        for name, p in module.model.named_parameters():
            g = reference.get_parameter(name).grad
            g = torch.zeros_like(p) if g is None else g
            torch.testing.assert_close(before[name] - p.detach(), 3.0 * g, rtol=1e-4, atol=1e-6, msg=name)


def test_module_trains_the_drawn_widths_identically_after_a_resume(tmp_path):
    """The sandwich with self-distillation end to end: every step trains the largest and smallest
    width and its draw; a run resumed from a checkpoint trains the same widths and losses as the
    uninterrupted one (the draw is a function of the seed and optimizer step)."""

    def module():
        return LanguageModeling(
            tiny_lm(),
            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
            width_sampling=WidthSampling(rule="sandwich", num_sampled=2, per_layer=True, seed=3),
            distillation=Distillation(weight=0.5, temperature=2.0),
        )

    straight = StepRecorder()
    trainer(tmp_path / "a", max_steps=6, callbacks=[straight]).fit(module(), TokenData(n=4))
    assert all(w[:2] == [64, 8] and len(w) == 4 for w in straight.widths)
    first = trainer(tmp_path / "b", max_steps=3)
    first.fit(module(), TokenData(n=4))
    first.save_checkpoint(tmp_path / "b.ckpt")
    resumed = StepRecorder()
    trainer(tmp_path / "c", max_steps=6, callbacks=[resumed]).fit(
        module(), TokenData(n=4), ckpt_path=tmp_path / "b.ckpt"
    )
    assert resumed.widths == straight.widths[3:]
    assert [float(x) for x in resumed.losses] == pytest.approx(
        [float(x) for x in straight.losses[3:]], rel=1e-6
    )


def test_micro_batches_of_one_optimizer_step_train_the_same_widths(tmp_path):
    module = LanguageModeling(
        tiny_lm(),
        optimizer=sgd,
        accumulate_grad_batches=2,
        width_sampling=WidthSampling(rule="sandwich", num_sampled=1, per_layer=True),
    )
    recorder = StepRecorder()
    trainer(tmp_path, max_steps=3, callbacks=[recorder]).fit(module, TokenData(batch_size=2))
    assert len(recorder.widths) == 6
    pairs = [recorder.widths[i : i + 2] for i in range(0, 6, 2)]
    assert all(a == b for a, b in pairs) and len({str(a) for a, _ in pairs}) > 1


def test_throughput_counts_the_flops_of_the_widths_each_step_trained():
    from lit_matmamba.training import ThroughputMonitor

    module = LanguageModeling(tiny_lm())
    monitor = ThroughputMonitor()
    for widths in ([64, 8, [64, 4]], [64, 32, 16, 8]):
        module.step_widths = widths
        expected = sum(module.model.flops_per_token(w, training=True, seq_len=16) for w in widths)
        assert monitor._step_flops_per_token(module, 16) == expected


# Self-distillation ---------------------------------------------------------------------------------
def test_distillation_targets_carry_no_gradient_into_the_teacher():
    """Teacher weight 0, student pure distillation: the gradient is that of the student's
    distillation loss against constant teacher logits; weights only the teacher's width uses
    (out_proj columns of the heads past the student's) get none."""
    model = tiny_lm()
    batch = TokenData().data[:4]
    distill = Distillation(weight=1.0, temperature=2.0)
    loss_fn = lambda b, w: model.loss(b, w, return_logits=True)  # noqa: E731
    losses = joint_backward(loss_fn, batch, [64, 16], [0.0, 1.0], distillation=distill)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.testing.assert_close(losses, torch.stack([model.loss(batch, w).detach() for w in (64, 16)]))

    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        teacher = model(batch[:, :-1], 64)
    distillation_loss(model(batch[:, :-1], 16), teacher, temperature=2.0).backward()
    for n, p in model.named_parameters():
        expected = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(got[n], expected, rtol=1e-5, atol=1e-7, msg=n)
    student_channels = CONFIG.heads(16) * CONFIG.headdim
    for i in range(CONFIG.n_layer):
        out_proj = got[f"backbone.layers.{i}.mixer.out_proj.weight"]  # (d_model, inner channels)
        assert out_proj[:, :student_channels].abs().sum() > 0
        assert torch.equal(out_proj[:, student_channels:], torch.zeros_like(out_proj[:, student_channels:]))


def test_distillation_mixes_task_and_distillation_loss():
    """Each student back-propagates (1 - weight) x task + weight x distillation; the teacher
    (first width) its task loss only."""
    model = tiny_lm()
    batch = TokenData().data[:4]
    widths, weights = [64, 32, 8], [0.5, 0.3, 0.2]
    distill = Distillation(weight=0.25, loss="soft_ce", temperature=1.5)
    joint_backward(
        lambda b, w: model.loss(b, w, return_logits=True), batch, widths, weights, distillation=distill
    )
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        teacher = model(batch[:, :-1], 64)
    total = 0.5 * model.loss(batch, 64)
    for width, weight in zip(widths[1:], weights[1:]):
        task, logits = model.loss(batch, width, return_logits=True)
        kd = distillation_loss(logits, teacher, "soft_ce", 1.5)
        total = total + weight * (0.75 * task + 0.25 * kd)
    total.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-7, msg=n)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_distillation_losses_are_kl_and_soft_cross_entropy(temperature):
    torch.manual_seed(0)
    student = torch.randn(2, 5, 11, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 5, 11, dtype=torch.float64)
    p = (teacher / temperature).softmax(-1)
    log_q = (student / temperature).log_softmax(-1)
    kl = (p * (p.log() - log_q)).sum(-1).mean() * temperature**2
    ce = -(p * log_q).sum(-1).mean() * temperature**2
    got_kl = distillation_loss(student, teacher, "kl", temperature)
    got_ce = distillation_loss(student, teacher, "soft_ce", temperature)
    torch.testing.assert_close(got_kl.double(), kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_ce.double(), ce, rtol=1e-5, atol=1e-6)
    (g_kl,) = torch.autograd.grad(got_kl, student)
    (g_ce,) = torch.autograd.grad(got_ce, student)
    torch.testing.assert_close(g_kl, g_ce)  # they differ by the teacher's entropy, a constant
    assert distillation_loss(teacher, teacher, "kl", temperature).abs() < 1e-6


def test_models_return_the_logits_their_loss_was_computed_from():
    lm = tiny_lm()
    ids = TokenData().data[:2]
    loss, logits = lm.loss(ids, 16, return_logits=True)
    assert torch.equal(loss, lm.loss(ids, 16)) and torch.equal(logits, lm(ids[:, :-1], 16))
    torch.manual_seed(0)
    vision = MatMambaVision("vision-tiny").eval()
    images, targets = torch.randn(3, 3, 32, 32), torch.tensor([1, 2, 3])
    loss, logits = vision.loss(images, targets, 16, return_logits=True)
    assert torch.equal(loss, vision.loss(images, targets, 16))
    assert torch.equal(logits, vision(images, 16).float())
    assert logits.shape == (3, 10)
    assert torch.equal(loss, F.cross_entropy(logits, targets))


def test_image_classification_distils_with_soft_targets(tmp_path):
    """Vision: mixup-style soft targets and sandwich + distillation go through the same step."""
    torch.manual_seed(0)
    images = torch.randn(8, 3, 32, 32)
    soft = torch.softmax(torch.randn(8, 10), -1)

    class Images(L.LightningDataModule):
        def train_dataloader(self):
            return torch.utils.data.DataLoader(list(zip(images, soft)), batch_size=4)

    module = ImageClassification(
        MatMambaVision("vision-tiny"),
        optimizer=sgd,
        width_sampling=WidthSampling(rule="sandwich", num_sampled=1),
        distillation=Distillation(weight=1.0),
    )
    before = params(module.model)
    recorder = StepRecorder()
    trainer(tmp_path, max_steps=2, callbacks=[recorder]).fit(module, Images())
    assert [w[:2] for w in recorder.widths] == [[64, 8], [64, 8]]
    assert any(not torch.equal(before[n], p) for n, p in module.model.named_parameters())


# Bad options -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(width_sampling=WidthSampling(num_sampled=1, sample_from="granularities")), "cannot draw 1"),
        (dict(width_sampling=WidthSampling(rule="sandwich", num_sampled=14)), "cannot draw 14"),
        (dict(width_sampling=WidthSampling(num_sampled=-1)), "num_sampled must be >= 0"),
        (dict(width_sampling=WidthSampling(rule="some")), "rule must be"),
        (
            dict(width_sampling=WidthSampling(rule="sandwich", num_sampled=1), cuda_graphs=True),
            "cuda_graphs needs the same widths every step",
        ),
        (dict(distillation=Distillation(), granularities=[32, 64]), "must be the widest"),
        (dict(distillation=Distillation(), granularities=[64]), "at least two widths"),
        (dict(loss_weights=[1.0], width_sampling=WidthSampling(rule="sandwich")), "loss_weights has 1"),
    ],
)
def test_bad_recipe_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LanguageModeling(tiny_lm(), **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(weight=1.5), "weight must be in"),
        (dict(loss="mse"), "loss must be"),
        (dict(temperature=0), "> 0"),
    ],
)
def test_bad_distillation_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Distillation(**kwargs)


def test_fixed_recipes_can_be_graphed():
    """Only sampling makes the widths change from step to step; distillation and the sandwich's
    ends alone do not (checked at construction, before any GPU is needed)."""
    for sampling in (None, WidthSampling(rule="sandwich")):
        module = LanguageModeling(
            tiny_lm(), width_sampling=sampling, distillation=Distillation(), cuda_graphs=True
        )
        assert module.width_policy.fixed


# Distributed: every rank trains the same widths ----------------------------------------------------
class WidthsPerRank(StepRecorder):
    """Checks at the end that every rank trained the same widths at every step."""

    def on_train_end(self, trainer, pl_module):
        gathered = [None] * trainer.world_size
        torch.distributed.all_gather_object(gathered, self.widths)
        with open(f"{trainer.default_root_dir}/widths-{trainer.global_rank}.txt", "w") as f:
            f.write(repr(gathered))


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_ranks_train_the_same_sampled_widths(tmp_path):
    from test_training import RankData, ddp_trainer

    t = ddp_trainer(tmp_path, WidthsPerRank())
    sampling = WidthSampling(rule="sandwich", num_sampled=2, per_layer=True)
    t.fit(LanguageModeling(tiny_lm(), optimizer=sgd, width_sampling=sampling), RankData())
    for rank in (0, 1):
        rank0, rank1 = ast.literal_eval((tmp_path / f"widths-{rank}.txt").read_text())
        assert len(rank0) == 3 and rank0 == rank1
        assert len({str(w[2:]) for w in rank0}) > 1  # and the draw changed from step to step


# GPU: the graphed step with distillation ---------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is None, reason="needs mamba-ssm (GPU install)")
def test_graphed_joint_step_with_distillation_equals_the_eager_step():
    from lit_matmamba.training.joint import capture_joint_step

    torch.manual_seed(0)
    cfg = MatMambaConfig(d_model=256, n_layer=4, vocab_size=1000, d_state=64, headdim=16, chunk_size=64)
    fast = MatMambaLM(cfg).cuda()
    eager = copy.deepcopy(fast)
    widths, weights = [256, 32, [256, 32, 128, 64]], [0.4, 0.3, 0.3]
    distill = Distillation(weight=0.5, temperature=2.0)
    example = torch.randint(0, 1000, (2, 129), device="cuda")
    step = capture_joint_step(
        lambda b, w: fast.loss(b, w, return_logits=True),
        example,
        widths,
        weights,
        fast.parameters(),
        distillation=distill,
    )
    batch = torch.randint(0, 1000, (2, 129), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    losses, _ = step(batch)

    def loss_fn(b, w):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return eager.loss(b, w, return_logits=True)

    expected = joint_backward(loss_fn, batch, widths, weights, distillation=distill)
    torch.testing.assert_close(losses, expected, rtol=1e-3, atol=1e-3)
    for (name, p), q in zip(fast.named_parameters(), eager.parameters()):
        rel = (p.grad.float() - q.grad.float()).norm() / q.grad.float().norm().clamp_min(1e-12)
        assert rel < 2e-2, name
