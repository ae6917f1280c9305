"""The joint training step, its bookkeeping, and distributed gradient reduction."""

from __future__ import annotations

import contextlib
import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_matmamba import MatMambaLM
from lit_matmamba.models import MatMambaConfig
from lit_matmamba.training import LanguageModeling, TokenClassification, load_model
from lit_matmamba.training.joint import joint_backward

VOCAB = 97


def tiny_lm(seed: int = 0) -> MatMambaLM:
    torch.manual_seed(seed)
    return MatMambaLM(MatMambaConfig.from_name("lm-tiny", vocab_size=VOCAB))


class TokenData(L.LightningDataModule):
    """Fixed random token sequences, in order (so two runs see the same batches)."""

    def __init__(self, n: int = 32, seq_len: int = 17, batch_size: int = 4, seed: int = 0) -> None:
        super().__init__()
        self.data = torch.randint(0, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(seed))
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(self.data[:8], batch_size=self.batch_size)


def sgd(params):
    return torch.optim.SGD(params, lr=1.0)


def trainer(tmp_path, **kw) -> L.Trainer:
    base = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    return L.Trainer(**{**base, **kw})


def ddp_trainer(tmp_path, callback: L.Callback) -> L.Trainer:
    """Three steps of DDP over two CPU processes (ddp_spawn), with `callback`."""
    return trainer(tmp_path, devices=2, strategy="ddp_spawn", max_steps=3, callbacks=[callback])


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("direct", [False, True], ids=["autograd-grads", "direct-grads"])
@pytest.mark.parametrize("weights", [None, [0.4, 0.3, 0.2, 0.1]], ids=["equal", "weighted"])
def test_step_gradient_equals_weighted_sum_of_width_losses(tmp_path, weights, direct):
    data = TokenData()
    module = LanguageModeling(
        tiny_lm(), loss_weights=weights, optimizer=sgd, gradient_clip_val=None, direct_weight_grads=direct
    )
    reference = copy.deepcopy(module.model)
    before = params(module.model)
    trainer(tmp_path, max_steps=1).fit(module, data)
    after = params(module.model)

    batch = next(iter(data.train_dataloader()))
    ws = weights or [0.25] * 4
    total = sum(
        w * reference.loss(batch, width) for w, width in zip(ws, reference.config.default_granularities())
    )
    total.backward()
    for name, p in reference.named_parameters():
        # SGD with lr 1: the update is minus the gradient
        torch.testing.assert_close(before[name] - after[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_accumulation_averages_micro_batches(tmp_path):
    data = TokenData(batch_size=2)
    module = LanguageModeling(
        tiny_lm(), granularities=[64, 16], optimizer=sgd, gradient_clip_val=None, accumulate_grad_batches=2
    )
    reference = copy.deepcopy(module.model)
    before = params(module.model)
    trainer(tmp_path, max_steps=1).fit(module, data)
    assert module.global_step == 1
    after = params(module.model)
    loader = iter(data.train_dataloader())
    for batch in (next(loader), next(loader)):
        (sum(0.5 * reference.loss(batch, w) for w in (64, 16)) / 2).backward()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(before[name] - after[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_joint_backward_reduces_on_the_last_width_only_and_returns_each_loss():
    """The joint step written once: per-width losses, unweighted; the gradient of the weighted sum;
    gradient reduction asked for on the last backward only (and not at all between micro-batches)."""
    model = tiny_lm()
    batch = TokenData().data[:4]
    widths, weights = [64, [32, 16], 8], [0.5, 0.3, 0.2]
    for sync_last in (True, False):
        model.zero_grad(set_to_none=True)
        asked = []

        @contextlib.contextmanager
        def sync(enabled, asked=asked):
            asked.append(enabled)
            yield

        losses = joint_backward(model.loss, batch, widths, weights, gradient_sync=sync, sync_last=sync_last)
        assert asked == [False, False, sync_last]
        got = {n: p.grad.clone() for n, p in model.named_parameters()}
        expected = torch.stack([model.loss(batch, w).detach() for w in widths])
        torch.testing.assert_close(losses, expected)
        model.zero_grad(set_to_none=True)
        sum(w * model.loss(batch, width) for w, width in zip(weights, widths)).backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)
    with pytest.raises(ValueError, match="2 widths but 1 weights"):
        joint_backward(model.loss, batch, [64, 8], [1.0])


def test_checkpoint_records_the_granularities_and_eval_widths_are_labelled(tmp_path):
    module = LanguageModeling(tiny_lm(), granularities=[64, 16], eval_widths=[[64, 8], 32], optimizer=sgd)
    assert module.evaluated() == [("w64", 64), ("w16", 16), ("mix0", [64, 8]), ("mix1", 32)]
    t = trainer(tmp_path, max_steps=1, enable_checkpointing=True)
    t.fit(module, TokenData())
    path = tmp_path / "model.ckpt"
    t.save_checkpoint(path)
    entry = torch.load(path, weights_only=False)["matmamba"]
    assert entry["granularities"] == [64, 16]
    assert "granularities" not in entry["config"]
    assert load_model(path).config == module.model.config


def test_gradient_clipping_bounds_the_update(tmp_path):
    module = LanguageModeling(tiny_lm(), optimizer=sgd, gradient_clip_val=1e-3)
    before = params(module.model)
    trainer(tmp_path, max_steps=1).fit(module, TokenData())
    update = torch.sqrt(
        sum(((before[n] - p.detach()) ** 2).sum() for n, p in module.model.named_parameters())
    )
    assert update <= 1e-3 * 1.001


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
    module = LanguageModeling(tiny_lm(), optimizer=sgd)
    with torch.no_grad():
        module.model.backbone.norm_f.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite training loss"):
        trainer(tmp_path, max_steps=1).fit(module, TokenData())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(granularities=[64, 30]), "granularities: width 30"),
        (dict(granularities=[]), "empty"),
        (dict(loss_weights=[1.0]), "loss_weights has 1"),
        (dict(eval_widths=[[64]]), "eval_widths\\[0\\]"),
        (dict(accumulate_grad_batches=0), "accumulate_grad_batches"),
        (dict(cuda_graphs=True, accumulate_grad_batches=2), "cuda_graphs needs accumulate_grad_batches=1"),
    ],
)
def test_bad_module_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LanguageModeling(tiny_lm(), **kwargs)


def test_cuda_graphs_without_a_gpu_is_a_clear_error(tmp_path):
    module = LanguageModeling(tiny_lm(), cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs=True cannot be used: the model is on cpu"):
        trainer(tmp_path, max_steps=1).fit(module, TokenData())


def test_cuda_graph_replays_only_batches_of_the_captured_structure_shapes_and_dtypes():
    from lit_matmamba.graphs import _spec

    captured = _spec((torch.zeros(4, 17), {"y": torch.zeros(4, dtype=torch.long)}))
    assert _spec((torch.ones(4, 17), {"y": torch.ones(4, dtype=torch.long)})) == captured
    assert _spec((torch.ones(2, 17), {"y": torch.ones(2, dtype=torch.long)})) != captured  # short batch
    assert _spec((torch.ones(4, 17), {"y": torch.ones(4)})) != captured  # dtype
    assert _spec([torch.ones(4, 17), {"y": torch.ones(4, dtype=torch.long)}]) != captured  # structure
    assert _spec((torch.ones(4, 17), {"z": torch.ones(4, dtype=torch.long)})) != captured  # key


def test_direct_weight_grads_refused_under_ddp():
    class WrappedLikeDDP(torch.nn.Module):
        def no_sync(self): ...

    assert LanguageModeling(tiny_lm())._use_direct_weight_grads(torch.nn.Module()) is True  # auto: on
    assert LanguageModeling(tiny_lm())._use_direct_weight_grads(WrappedLikeDDP()) is False  # auto: off
    with pytest.raises(ValueError, match="cannot be used with DDP, FSDP or tensor parallelism"):
        LanguageModeling(tiny_lm(), direct_weight_grads=True)._use_direct_weight_grads(WrappedLikeDDP())


def test_resume_gives_the_same_next_loss(tmp_path):
    def module():
        return LanguageModeling(tiny_lm(), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))

    class Recorder(L.Callback):
        def __init__(self):
            self.losses = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))

    # One batch per epoch, so every step sees the same data and this tests the module's state
    # (weights, AdamW moments, step count); resuming mid-epoch data is the data module's job and
    # is tested with it (tests/test_text_data.py).
    straight = Recorder()
    trainer(tmp_path / "a", max_steps=6, callbacks=[straight]).fit(module(), TokenData(n=4))

    first = trainer(tmp_path / "b", max_steps=3)
    first.fit(module(), TokenData(n=4))
    first.save_checkpoint(tmp_path / "b.ckpt")
    resumed = Recorder()
    trainer(tmp_path / "c", max_steps=6, callbacks=[resumed]).fit(
        module(), TokenData(n=4), ckpt_path=tmp_path / "b.ckpt"
    )
    assert len(resumed.losses) == 3
    assert resumed.losses == pytest.approx(straight.losses[3:], rel=1e-6)


# Distributed: gradients reduced once per optimizer step -----------------------------------------
class CountReductions(L.Callback):
    """Counts DDP gradient all-reduces (through a comm hook) per optimizer step."""

    def __init__(self):
        self.calls = 0
        self.per_step = []

    def on_train_start(self, trainer, pl_module):
        def hook(state, bucket):
            self.calls += 1
            fut = torch.futures.Future()
            tensor = bucket.buffer()
            torch.distributed.all_reduce(tensor)
            fut.set_result(tensor / torch.distributed.get_world_size())
            return fut

        trainer.strategy.model.register_comm_hook(None, hook)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.per_step.append(self.calls)
        self.calls = 0

    def on_train_end(self, trainer, pl_module):
        # every rank ends with the same weights (the gradients were averaged)
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(trainer.world_size)]
        torch.distributed.all_gather(gathered, flat)
        assert all(torch.equal(g, gathered[0]) for g in gathered)
        path = trainer.default_root_dir + f"/calls-{len(pl_module.granularities)}-{trainer.global_rank}.txt"
        with open(path, "w") as f:
            f.write(" ".join(map(str, self.per_step)))


class RankData(TokenData):
    def train_dataloader(self):
        rank = self.trainer.global_rank
        return DataLoader(self.data[rank::2], batch_size=self.batch_size)  # different data per rank


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_reduces_gradients_once_per_optimizer_step(tmp_path):
    counts = {}
    for grans in ([64], [64, 32, 16, 8]):
        t = ddp_trainer(tmp_path, CountReductions())
        t.fit(LanguageModeling(tiny_lm(), granularities=grans, optimizer=sgd), RankData())
        counts[len(grans)] = [(tmp_path / f"calls-{len(grans)}-{r}.txt").read_text() for r in (0, 1)]
    single = [int(c) for c in counts[1][0].split()]
    joint = [int(c) for c in counts[4][0].split()]
    assert len(joint) == 3 and min(single) > 0
    assert joint == single, f"reductions per step: one width {single}, four widths {joint}"


# --- token classification ---------------------------------------------------------------------
class TagData(TokenData):
    """TokenData with a label per token, the token's id mod 3, except the first of each sequence,
    which has none (-100)."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.labels = self.data % 3
        self.labels[:, 0] = TokenClassification.ignore_index

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.data, self.labels), batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.data[:8], self.labels[:8]), batch_size=self.batch_size)


def tagger(seed: int = 0) -> TokenClassification:
    torch.manual_seed(seed)
    config = MatMambaConfig.from_name("lm-tiny", vocab_size=VOCAB)
    return TokenClassification(MatMambaLM(config, head=nn.Linear(config.d_model, 3)), granularities=[64, 16])


def test_token_classification_loss_and_metrics_count_labelled_tokens_only():
    module = tagger()
    data = TagData()
    batches = list(data.train_dataloader())[:2]
    ids, labels = batches[0]
    labelled = labels != -100
    logits = module.model(ids, 16)
    assert torch.allclose(module.loss((ids, labels), 16), F.cross_entropy(logits[labelled], labels[labelled]))
    # Dropping labels changes the loss only through the tokens that keep theirs.
    fewer = labels.clone()
    fewer[:, 5:] = -100
    kept = fewer != -100
    assert torch.allclose(module.loss((ids, fewer), 16), F.cross_entropy(logits[kept], fewer[kept]))
    assert module.loss((ids, torch.full_like(labels, -100)), 16).item() == 0.0
    # The split's accuracy is over every labelled token, whatever batch it is in.
    metrics = module.make_metrics()
    module.update_metrics(metrics, (ids, fewer), 16)
    module.update_metrics(metrics, batches[1], 16)
    preds = torch.cat([module.model(ids, 16)[kept], module.model(batches[1][0], 16)[batches[1][1] != -100]])
    targets = torch.cat([fewer[kept], batches[1][1][batches[1][1] != -100]])
    assert torch.allclose(metrics["acc"].compute(), (preds.argmax(-1) == targets).float().mean())
    assert torch.allclose(metrics["loss"].compute(), F.cross_entropy(preds, targets))


def test_token_classification_trains_every_width_and_records_its_head(tmp_path):
    module = tagger()
    data = TagData()
    val = list(data.val_dataloader())
    with torch.no_grad():
        before = {w: sum(module.loss(b, w) for b in val) / len(val) for w in (64, 16)}
    t = trainer(tmp_path, max_steps=40, limit_val_batches=None)
    t.fit(module, data)  # validates at the end of each epoch of 8 batches
    for width in (64, 16):
        assert t.callback_metrics[f"val/loss/w{width}"] < before[width]
        assert t.callback_metrics[f"val/acc/w{width}"] > 0.6  # chance: about 1/3
    path = tmp_path / "tagger.ckpt"
    t.save_checkpoint(path)
    model = load_model(path)  # the nn.Linear head's arguments are read off it
    ids, _ = next(iter(data.val_dataloader()))
    assert torch.equal(model(ids, 16), module.model(ids, 16))


def test_token_classification_needs_a_head_with_an_output_per_token():
    module = TokenClassification(tiny_lm())  # the default head: next-token logits over the vocabulary
    ids = torch.randint(0, VOCAB, (2, 9))
    flat = MatMambaLM(MatMambaConfig.from_name("lm-tiny", vocab_size=VOCAB), head=nn.Flatten(1))
    with pytest.raises(ValueError, match=r"head maps \(B, L, d_model\) to \(B, L, classes\)"):
        TokenClassification(flat).loss((ids, ids), None)
    assert module.loss((ids, ids % 3), None).isfinite()  # any (B, L, C) output fits (C here: the vocabulary)
