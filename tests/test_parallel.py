"""Scale-out (training/parallel/): head placement, sharded forward and backward against the
unsharded model, checkpoint conversions, gradient reduction and clipping across shards.

The multi-process tests start 2 or 4 processes on the CPU (gloo) with torch.multiprocessing; each
runs several checks, to pay the start-up once. Models are float64, so "equal" is tight.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import socket
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lit_matmamba import MatMambaLM
from lit_matmamba.models import MatMambaConfig
from lit_matmamba.training import parallel
from lit_matmamba.training.optim import param_groups
from lit_matmamba.training.parallel.tensor_parallel import tensor_parallel_layouts

VOCAB = 97
# lm-tiny with headdim 4: 32 heads at the full width 64, so widths 64/32/16/8 have 32/16/8/4 heads
# and every granularity splits over 4 ranks.
CONFIG = dict(vocab_size=VOCAB, headdim=4)
WIDTHS = [64, 32, 16, 8, [64, 8]]  # the granularities and a Mix'n'Match width


def tiny(seed: int = 0) -> MatMambaLM:
    torch.manual_seed(seed)
    return MatMambaLM(MatMambaConfig.from_name("lm-tiny", **CONFIG)).double()


def test_the_model_imports_nothing_distributed():
    """Parallelism lives in training/parallel/; the model is plain PyTorch."""
    models = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lit_matmamba", "models"
    )
    for name in os.listdir(models):
        if name.endswith(".py"):
            with open(os.path.join(models, name)) as f:
                text = f.read()
            assert "torch.distributed" not in text and "DTensor" not in text, name


def test_activation_checkpointing_on_one_process_keeps_the_gradients():
    ref = tiny()
    model = parallel.parallelize(copy.deepcopy(ref), None, activation_checkpointing=True)
    ids = torch.randint(0, VOCAB, (2, 17))
    for m in (model, ref):
        sum(m.loss(ids, w) for w in (64, [32, 8])).backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=0, msg=name)


# Placement and checks, one process --------------------------------------------------------------
@pytest.mark.parametrize("preset", ["lm-130m", "lm-370m", "lm-790m", "lm-1.4b", "vision-35m", "vision-135m"])
@pytest.mark.parametrize("tp", [2, 4, 8])
def test_every_granularity_is_spread_evenly_over_the_ranks(preset, tp):
    config = MatMambaConfig.from_name(preset)
    for width in config.default_granularities():
        counts = parallel.heads_per_rank(config, width, tp)
        assert counts == [config.heads(width) // tp] * tp, (width, counts)
    # Round-robin: rank r holds heads r, r + tp, ...; each width is a prefix of every rank's heads.
    H = config.heads(config.d_model)
    held = [parallel.rank_heads(H, tp, r) for r in range(tp)]
    assert sorted(h for heads in held for h in heads) == list(range(H))
    for width in config.default_granularities():
        k = config.heads(width)
        for heads in held:
            used = [h for h in heads if h < k]
            assert used == heads[: len(used)]


def test_tensor_parallel_layout_is_a_permutation_of_rank_blocks():
    model = tiny()
    mixer = model.backbone.layers[0].mixer
    P, H, d_bc = mixer.config.headdim, mixer.nheads, mixer.d_bc
    layouts = tensor_parallel_layouts(mixer, 4)
    params = dict(mixer.named_parameters())
    for name, layout in layouts.items():
        if name in params:  # in_proj has no bias here
            assert sorted(layout.index.tolist()) == list(range(params[name].shape[layout.dim])), name
    # Rank 1's block of dt_bias holds heads 1, 5, 9, ... and its in_proj block starts with its
    # quarter of the B and C rows, then the x rows of those heads.
    per_head = layouts["dt_bias"].index.view(4, -1)
    assert per_head[1].tolist() == list(range(1, H, 4))
    in_proj = layouts["in_proj.weight"].index.view(4, -1)[1]
    assert in_proj[: d_bc // 4].tolist() == list(range(d_bc // 4, d_bc // 2))
    assert in_proj[d_bc // 4 : d_bc // 4 + P].tolist() == list(range(d_bc + P, d_bc + 2 * P))


def test_a_tensor_parallel_size_that_cannot_split_a_width_is_a_clear_error():
    config = MatMambaConfig.from_name("lm-tiny")  # headdim 8: 16/8/4/2 heads at 64/32/16/8
    parallel.check_tensor_parallel(config, config.default_granularities(), 2)
    with pytest.raises(
        ValueError, match=r"tensor_parallel_size=4 cannot spread width 8 .* 2 heads.*\[1, 2\]"
    ):
        parallel.check_tensor_parallel(config, config.default_granularities(), 4)
    with pytest.raises(ValueError, match="width 4 .* 1 heads"):
        parallel.check_tensor_parallel(config, [64, [64, 4]], 2)  # a Mix'n'Match width too
    with pytest.raises(ValueError, match="B and C channels"):
        parallel.check_tensor_parallel(config.replace(d_state=1), [64], 4)


@pytest.mark.parametrize(
    "sizes, world, expected",
    [
        (("auto", 1), 4, (4, 1)),  # configs/strategy/fsdp.yaml
        ((1, "auto"), 4, (1, 4)),  # tp.yaml
        (("auto", 2), 8, (4, 2)),
        (("auto", "auto"), 8, ("auto", "auto")),  # fsdp_tp.yaml: Lightning's nodes x devices
    ],
)
def test_an_auto_mesh_size_follows_the_other(sizes, world, expected):
    strategy = types.SimpleNamespace(_data_parallel_size=sizes[0], _tensor_parallel_size=sizes[1])
    parallel.resolve_mesh_sizes(strategy, world)
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == expected


@pytest.mark.parametrize("sizes", [(2, 4), ("auto", 4), (1, 3)])
def test_a_mesh_that_does_not_fit_the_world_is_a_clear_error(sizes):
    strategy = types.SimpleNamespace(_data_parallel_size=sizes[0], _tensor_parallel_size=sizes[1])
    with pytest.raises(ValueError, match="does not fit the 2 processes.*product is 2"):
        parallel.resolve_mesh_sizes(strategy, 2)


def test_a_distributed_checkpoint_reads_wherever_a_single_file_does(tmp_path):
    """io.read_checkpoint opens a distributed checkpoint's directory as it opens a file: load_model,
    export (io.load + save) and embed's record give the file's model and entries; a directory of
    torch.distributed.checkpoint without Lightning's meta.pt is a clear error."""
    from lit_matmamba.embed import checkpoint_record
    from lit_matmamba.io import checkpoint_metadata, load, load_model, read_checkpoint

    model = tiny().float()  # as load_model builds it
    torch.save(
        {
            "matmamba": checkpoint_metadata(model, [64, 32]),
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "optimizer_states": [],
            "global_step": 7,
        },
        tmp_path / "one.ckpt",
    )
    directory = parallel.to_distributed_checkpoint(tmp_path / "one.ckpt", tmp_path / "dcp")
    assert (directory / ".metadata").is_file()
    expected = model.state_dict()
    for source in (tmp_path / "one.ckpt", directory):
        got = load_model(source).state_dict()
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], v) for k, v in expected.items()), source
    look = read_checkpoint(directory, mmap=True)["state_dict"]  # no shard read
    assert {k: (v.shape, v.device.type) for k, v in look.items()} == {
        f"model.{k}": (v.shape, "meta") for k, v in expected.items()
    }
    record = checkpoint_record(directory)
    assert (record.granularities, record.global_step) == ([64, 32], 7)
    exported = load(directory).save(tmp_path / "w32", 32)
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(load_model(exported)(ids), model(ids, 32), rtol=0, atol=0)

    (directory / "meta.pt").unlink()
    with pytest.raises(ValueError, match="not a distributed checkpoint .* as ModelParallelStrategy writes"):
        load_model(directory)


# Several processes ---------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def spawn(world: int, fn, *args) -> None:
    """Run fn(rank, *args) on `world` processes of one gloo group; a failure on any fails the test."""
    mp.spawn(_entry, args=(world, _free_port(), fn, args), nprocs=world)


def _mesh(dp: int, tp: int):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (dp, tp), mesh_dim_names=("data_parallel", "tensor_parallel"))


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _stored(ref: MatMambaLM, tp: int) -> dict[str, object]:
    """Stored layout (relative to the internal one) of every tensor-parallel parameter, by name."""
    if tp == 1:
        return {}
    return {
        f"backbone.layers.{i}.mixer.{name}": layout
        for i, layer in enumerate(ref.backbone.layers)
        for name, layout in tensor_parallel_layouts(layer.mixer, tp).items()
    }


def _check_equals_unsharded(dp: int, tp: int, rank: int) -> None:
    """Outputs, loss and every gradient (gathered) of the sharded model equal the unsharded ones
    at every width; under data parallelism each rank has its own part of the batch and the
    gradients are the mean over the whole batch."""
    mesh = _mesh(dp, tp)
    ref = tiny()
    model = parallel.parallelize(copy.deepcopy(ref), mesh, widths=WIDTHS)
    stored = _stored(ref, tp)
    ids = torch.randint(0, VOCAB, (4, 17), generator=torch.Generator().manual_seed(1))
    parts = ids.chunk(dp)
    mine = parts[mesh["data_parallel"].get_local_rank()]
    # Round-robin placement: this rank's block of dt_bias holds heads r, r + tp, ...
    r = mesh["tensor_parallel"].get_local_rank()
    local = model.backbone.layers[0].mixer.dt_bias
    if tp > 1 and dp == 1:  # (FSDP shards the block further)
        torch.testing.assert_close(
            local.to_local(), ref.backbone.layers[0].mixer.dt_bias[r::tp], rtol=0, atol=0
        )
    for width in WIDTHS:
        with torch.no_grad():
            torch.testing.assert_close(model(mine, width), ref(mine, width), rtol=1e-10, atol=1e-12)
        model.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        loss = model.loss(mine, width)
        loss.backward()
        torch.testing.assert_close(loss, ref.loss(mine, width), rtol=1e-12, atol=0)
        (sum(ref.loss(part, width) for part in parts) / dp).backward()
        expected = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            grad = expected[name].grad
            if name in stored:
                grad = grad.index_select(stored[name].dim, stored[name].index)
            torch.testing.assert_close(_full(p.grad), grad, rtol=1e-8, atol=1e-12, msg=f"{width} {name}")


def _check_checkpoint_conversions(dp: int, tp: int, rank: int, tmp: str) -> None:
    """Sharded <-> canonical, bit for bit: the full state dict of a sharded model is the unsharded
    model's; a distributed checkpoint reloads into a sharded model of another seed, and reads on
    one process; a single-file (full) state dict loads sharded; so does the optimizer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    mesh = _mesh(dp, tp)
    full = StateDictOptions(full_state_dict=True)
    ref = tiny()
    expected = ref.state_dict()
    model = parallel.parallelize(copy.deepcopy(ref), mesh, widths=WIDTHS)

    def assert_canonical(m):
        got = get_model_state_dict(m, options=full)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(got[key], value), key

    assert_canonical(model)
    path = os.path.join(tmp, f"dcp-{dp}x{tp}")
    dcp.save(get_model_state_dict(model), checkpoint_id=path)
    other = parallel.parallelize(tiny(seed=1), mesh, widths=WIDTHS)
    state = get_model_state_dict(other)
    dcp.load(state, checkpoint_id=path)
    other.load_state_dict(state)
    assert_canonical(other)
    # A checkpoint written under one mesh loads under another (here: every mesh reads the 1 x world one).
    if rank == 0 and (dp, tp) == (1, dist.get_world_size()):
        from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

        one = {}
        _load_state_dict(
            one, storage_reader=dcp.FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(), no_dist=True
        )
        for key, value in expected.items():
            assert torch.equal(one[key], value), key
    dist.barrier()
    for source in (f"dcp-1x{dist.get_world_size()}", f"dcp-{dist.get_world_size()}x1"):
        if os.path.isdir(os.path.join(tmp, source)):
            other = parallel.parallelize(tiny(seed=2), mesh, widths=WIDTHS)
            state = get_model_state_dict(other)
            dcp.load(state, checkpoint_id=os.path.join(tmp, source))
            other.load_state_dict(state)
            assert_canonical(other)
    for options in (full, StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)):
        other = parallel.parallelize(tiny(seed=3), mesh, widths=WIDTHS)
        set_model_state_dict(other, {k: v.clone() for k, v in expected.items()}, options=options)
        assert_canonical(other)

    # Optimizer state: canonical = what one process's optimizer holds (the internal layout).
    def step(m):
        opt = torch.optim.AdamW(param_groups(m), lr=1e-2)
        parallel.register_optimizer(opt, m)
        m.zero_grad()
        m.loss(torch.arange(34).view(2, 17) % VOCAB, 32).backward()
        opt.step()
        return opt

    ref_opt = step(ref)
    opt = step(model)
    names = {p: n for n, p in ref.named_parameters()}
    ref_state = {names[p]: s for p, s in ref_opt.state.items()}
    got = get_optimizer_state_dict(model, opt, options=full)["state"]
    for name, entry in ref_state.items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(got[name][key], entry[key], rtol=1e-8, atol=1e-14, msg=f"{name} {key}")
    # ... and round-trips bit for bit through a distributed checkpoint into a fresh optimizer.
    opt_path = os.path.join(tmp, f"opt-{dp}x{tp}")
    dcp.save(get_optimizer_state_dict(model, opt), checkpoint_id=opt_path)
    model.zero_grad(set_to_none=True)  # as when resuming: no gradients yet
    fresh = torch.optim.AdamW(param_groups(model), lr=1e-2)
    parallel.register_optimizer(fresh, model)
    state = get_optimizer_state_dict(model, fresh)
    dcp.load(state, checkpoint_id=opt_path)
    set_optimizer_state_dict(model, fresh, state)
    for p in model.parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(_full(fresh.state[p][key]), _full(opt.state[p][key]))


def _check_joint_step(rank: int) -> None:
    """The joint step under FSDP2 reduces gradients once per optimizer step, however many widths;
    clipping sees the global norm across shards (FSDP2, tensor parallelism; the 2-D mesh on 4)."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group

    from lit_matmamba.training.joint import joint_backward

    calls = []
    reduce = _fsdp_param_group.foreach_reduce

    def counted(*args, **kwargs):
        calls.append(1)
        return reduce(*args, **kwargs)

    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(rank))
    _fsdp_param_group.foreach_reduce = counted
    try:
        counts = []
        for widths in ([64], [64, 32, 16, 8]):
            model = parallel.parallelize(tiny(), _mesh(2, 1), widths=widths)
            calls.clear()
            joint_backward(
                model.loss,
                ids,
                widths,
                [1 / len(widths)] * len(widths),
                gradient_sync=lambda enabled, m=model: parallel.gradient_sync(m, enabled),
            )
            counts.append(len(calls))
    finally:
        _fsdp_param_group.foreach_reduce = reduce
    assert counts[0] > 0 and counts[1] == counts[0], f"reductions: one width {counts[0]}, four {counts[1]}"

    for dp, tp in ((2, 1), (1, 2)):
        _check_clipping(dp, tp)


def _check_optimizer_state_moves(rank: int, tmp: str) -> None:
    """Under tensor parallelism alone (mixers sharded, the rest replicated) the optimizer has the
    parameter groups it has on one process (optim.param_groups keeps mixers apart), so a
    one-process optimizer's state, keyed by name as this project's checkpoints key it, loads into
    it through a distributed checkpoint (ModelParallelStrategy's way; main.py converts a single
    file): every moment on its parameter."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(5))
    ref = tiny()
    model = parallel.parallelize(copy.deepcopy(ref), _mesh(1, 2), widths=WIDTHS)
    ref_opt = torch.optim.AdamW(param_groups(ref), lr=1e-2)
    opt = torch.optim.AdamW(param_groups(model), lr=1e-2)  # foreach over each group: one kind each
    parallel.register_optimizer(opt, model)
    assert len(opt.param_groups) == len(ref_opt.param_groups) == 4
    for m, o in ((ref, ref_opt), (model, opt)):
        m.loss(ids, 16).backward()
        o.step()
        o.zero_grad(set_to_none=True)
    names = {p: n for n, p in ref.named_parameters()}
    order = [names[p] for g in ref_opt.param_groups for p in g["params"]]
    path = os.path.join(tmp, "one-process-optimizer")
    if rank == 0:
        state = ref_opt.state_dict()
        named = {
            "state": {order[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]],
        }
        dcp.save({"optimizer": named}, checkpoint_id=path, no_dist=True)
    dist.barrier()
    fresh = torch.optim.AdamW(param_groups(model), lr=1e-3)
    parallel.register_optimizer(fresh, model)
    state = {"optimizer": get_optimizer_state_dict(model, fresh)}
    dcp.load(state, checkpoint_id=path)
    set_optimizer_state_dict(model, fresh, state["optimizer"])
    assert [g["lr"] for g in fresh.param_groups] == [1e-2] * 4
    for p in model.parameters():  # the one-process moments, up to rounding in the gradients
        torch.testing.assert_close(
            _full(fresh.state[p]["exp_avg"]), _full(opt.state[p]["exp_avg"]), rtol=1e-8, atol=1e-14
        )


def _check_options_and_bad_input(rank: int, tmp: str) -> None:
    """Activation checkpointing keeps the gradients exact (FSDP2, TP); bf16 mixed precision
    computes in bf16 and keeps float32 parameters and gradients; a tensor-parallel size that
    cannot split a width is a clear error, under Lightning before any step."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from lit_matmamba.training.parallel.parallelize import CheckpointedBlock

    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(3))
    for dp, tp in ((2, 1), (1, 2)):
        ref = tiny()
        model = parallel.parallelize(
            copy.deepcopy(ref), _mesh(dp, tp), widths=WIDTHS, activation_checkpointing=True
        )
        assert isinstance(model.backbone.layers[0], CheckpointedBlock)
        stored = _stored(ref, tp)
        for width in (32, [64, 8]):
            model.zero_grad(set_to_none=True)
            ref.zero_grad(set_to_none=True)
            model.loss(ids, width).backward()
            ref.loss(ids, width).backward()
            for name, p in model.named_parameters():
                grad = dict(ref.named_parameters())[name].grad
                if name in stored:
                    grad = grad.index_select(stored[name].dim, stored[name].index)
                torch.testing.assert_close(_full(p.grad), grad, rtol=1e-8, atol=1e-12, msg=f"{width} {name}")

    ref = tiny().float()
    model = parallel.parallelize(copy.deepcopy(ref), _mesh(2, 1), widths=WIDTHS, mixed_precision="bf16")
    logits = model(ids, 32)
    assert logits.dtype == torch.bfloat16
    loss = model.loss(ids, 32)
    loss.backward()
    assert loss.item() == pytest.approx(ref.loss(ids, 32).item(), rel=2e-2)
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())

    # Built on the meta device on every rank (trainer.init_module(empty_init=True)): rank 0 builds it
    # afresh, with the model's own initialisation, and every rank gets its shards of that.
    with torch.device("meta"):
        meta = MatMambaLM(MatMambaConfig.from_name("lm-tiny", **CONFIG))
    with (
        pytest.warns(UserWarning, match="meta device on rank 0 too")
        if rank == 0
        else contextlib.nullcontext()
    ):
        model = parallel.parallelize(meta, _mesh(1, 2), widths=WIDTHS)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    mixer = "backbone.layers.1.mixer."
    assert torch.equal(state[mixer + "D"], torch.ones(32)) and torch.equal(
        state[mixer + "norm.weight"], torch.ones(128)
    )
    assert (state[mixer + "A_log"] >= 0).all() and (state[mixer + "A_log"] <= math.log(16)).all()
    assert 0.01 < state["backbone.embedding.weight"].std() < 0.03  # normal(0, 0.02)
    assert torch.isfinite(model.loss(ids, 16))

    with pytest.raises(ValueError, match="tensor_parallel_size=2 cannot spread width 4 evenly"):
        parallel.parallelize(MatMambaLM(MatMambaConfig.from_name("lm-tiny")), _mesh(1, 2), widths=[64, 4])
    _fit_with_a_width_tp_cannot_split(rank, tmp)


def _fit_with_a_width_tp_cannot_split(rank: int, tmp: str) -> None:
    import lightning as L
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader

    from lit_matmamba.training import LanguageModeling

    # Lightning takes the processes this test started (LOCAL_RANK) and their process group.
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(dist.get_world_size()))
    steps = []

    class Steps(L.Callback):
        def on_train_batch_start(self, *args):
            steps.append(1)

    trainer = L.Trainer(
        accelerator="cpu",
        devices=dist.get_world_size(),
        strategy=ModelParallelStrategy(1, dist.get_world_size()),
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp,
        callbacks=[Steps()],
    )
    module = LanguageModeling(
        MatMambaLM(MatMambaConfig.from_name("lm-tiny", vocab_size=VOCAB)), granularities=[64, 4]
    )
    with pytest.raises(ValueError, match="tensor_parallel_size=2 cannot spread width 4 evenly"):
        trainer.fit(module, DataLoader(torch.randint(0, VOCAB, (8, 17)), batch_size=4))
    assert not steps


def _check_vision(dp: int, tp: int) -> None:
    """MatMambaVision under the same plan (its patch embedding, positions and head replicated)."""
    from lit_matmamba import MatMambaVision

    torch.manual_seed(0)
    ref = MatMambaVision("vision-tiny").double()
    mesh = _mesh(dp, tp)
    model = parallel.parallelize(copy.deepcopy(ref), mesh, widths=[64, 8])
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    targets = torch.arange(4) % 10
    part = mesh["data_parallel"].get_local_rank()
    images_mine, targets_mine = images.chunk(dp)[part], targets.chunk(dp)[part]
    stored = _stored(ref, tp)
    for width in (64, 8, [64, 8]):
        model.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        torch.testing.assert_close(model(images_mine, width), ref(images_mine, width), rtol=1e-10, atol=1e-12)
        model.loss(images_mine, targets_mine, width).backward()
        sum(ref.loss(i, t, width) for i, t in zip(images.chunk(dp), targets.chunk(dp))).div(dp).backward()
        for name, p in model.named_parameters():
            grad = dict(ref.named_parameters())[name].grad
            if name in stored:
                grad = grad.index_select(stored[name].dim, stored[name].index)
            torch.testing.assert_close(_full(p.grad), grad, rtol=1e-8, atol=1e-12, msg=f"{width} {name}")


def _two_processes(rank: int, tmp: str) -> None:
    for dp, tp in ((2, 1), (1, 2)):
        _check_equals_unsharded(dp, tp, rank)
        _check_vision(dp, tp)
        _check_checkpoint_conversions(dp, tp, rank, tmp)
    _check_joint_step(rank)
    _check_optimizer_state_moves(rank, tmp)
    _check_options_and_bad_input(rank, tmp)


def _check_clipping(dp: int, tp: int) -> None:
    """Gradient clipping sees the global norm across shards."""
    ref = tiny()
    everything = torch.randint(0, VOCAB, (4, 17), generator=torch.Generator().manual_seed(9))
    sum(0.5 * ref.loss(part, w) for part in everything.chunk(dp) for w in (64, 8)).div(dp).backward()
    expected = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e-3)
    clipped = {n: p.grad.clone() for n, p in ref.named_parameters()}
    mesh = _mesh(dp, tp)
    model = parallel.parallelize(tiny(), mesh, widths=[64, 8])
    mine = everything.chunk(dp)[mesh["data_parallel"].get_local_rank()]
    sum(0.5 * model.loss(mine, w) for w in (64, 8)).backward()
    norm = parallel.clip_grad_norm(model, model.parameters(), 1e-3)
    torch.testing.assert_close(norm, expected.float(), rtol=1e-6, atol=0)
    stored = _stored(ref, tp)
    for name, p in model.named_parameters():
        grad = clipped[name]
        if name in stored:
            grad = grad.index_select(stored[name].dim, stored[name].index)
        torch.testing.assert_close(_full(p.grad), grad, rtol=1e-6, atol=1e-12, msg=name)


def _four_processes(rank: int, tmp: str) -> None:
    for dp, tp in ((1, 4), (2, 2)):
        _check_equals_unsharded(dp, tp, rank)
        _check_checkpoint_conversions(dp, tp, rank, tmp)
        _check_clipping(dp, tp)


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp2_and_tp2_equal_the_unsharded_model_convert_checkpoints_exactly_and_check_options(tmp_path):
    spawn(2, _two_processes, str(tmp_path))


@pytest.mark.distributed
@pytest.mark.slow
def test_tp4_and_the_2x2_mesh_equal_the_unsharded_model_convert_checkpoints_exactly_and_clip(tmp_path):
    spawn(4, _four_processes, str(tmp_path))


# Under Lightning ----------------------------------------------------------------------------------
# What Lightning's launcher and our spawned processes put in the environment of a process.
LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "GROUP_RANK")


@pytest.fixture
def process_group():
    """For a test that starts a one-process ModelParallelStrategy here: leave no group and no
    launcher environment behind (a later main.py would take itself for a started rank)."""
    before = {key: os.environ.get(key) for key in LAUNCH_ENV}
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.mark.distributed
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(cuda_graphs=True), "cuda_graphs=True cannot be used: .*distributed or sharded"),
        (dict(direct_weight_grads=True), "direct_weight_grads=True cannot be used with DDP, FSDP or tensor"),
        (dict(mixed_precision="fp8"), "mixed_precision must be None or one of"),
    ],
)
def test_single_process_features_under_a_sharded_strategy_are_clear_errors(
    tmp_path, process_group, kwargs, message
):
    import lightning as L
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader

    from lit_matmamba.training import LanguageModeling

    steps = []

    class Steps(L.Callback):
        def on_train_batch_start(self, *args):
            steps.append(1)

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=ModelParallelStrategy(1, 1),
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[Steps()],
    )
    module = LanguageModeling(tiny().float(), **kwargs)
    with pytest.raises(ValueError, match=message):
        trainer.fit(module, DataLoader(torch.randint(0, VOCAB, (8, 17)), batch_size=4))
    assert not steps  # before any step ran


# The command line, as a user runs it: main.py fit with a strategy config on 2 CPU processes ----------
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STOP_AT = '''
import lightning as L


class StopAt(L.Callback):
    """Stops the fit after `step` optimizer steps (an interruption: the configured max_steps and
    learning-rate schedule stay those of the whole run)."""

    def __init__(self, step: int = 2) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True
'''


def _demo_args(logs, demo: str = "lm_demo") -> list[str]:
    """configs/<demo>.yaml (every shipped callback on) cut down to 4 steps, validating every 2."""
    return [
        "--config",
        os.path.join(REPO, f"configs/{demo}.yaml"),
        "--trainer.accelerator=cpu",
        "--trainer.max_steps=4",
        "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=2",
        "--trainer.log_every_n_steps=1",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={logs}",
        "--model.init_args.scheduler.init_args.warmup_steps=1",
        "--data.init_args.num_workers=0",
    ]


def _main_fit(tmp, name, *args, devices=2, strategy=None, demo="lm_demo") -> str:
    """Run `main.py fit` in a new process (which starts the others); returns the run directory."""
    import subprocess
    import sys

    (tmp / "stop_at.py").write_text(STOP_AT)
    logs = tmp / name
    command = [
        sys.executable,
        os.path.join(REPO, "main.py"),
        "fit",
        *_demo_args(logs, demo),
        f"--trainer.devices={devices}",
    ]
    if strategy:
        command += ["--config", os.path.join(REPO, f"configs/strategy/{strategy}.yaml")]
    env = {key: value for key, value in os.environ.items() if key not in LAUNCH_ENV}  # a fresh launch
    env["PYTHONPATH"] = os.pathsep.join([str(tmp), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run([*command, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return str(logs / demo / "version_0")


def _losses(run: str, tag: str = "train/loss") -> dict[int, float]:
    from lit_matmamba.plots import read_scalars

    return dict(read_scalars(run)[tag])


@pytest.fixture(scope="module")
def one_process_start():
    """The demo's model and data as `main.py` builds them with its seed, and the per-width losses of
    rank 0's first batch (of 2 ranks), computed on one process."""
    import lightning as L

    from lit_matmamba.cli import MatMambaCLI
    from lit_matmamba.training import NestedModule

    cli = MatMambaCLI(
        NestedModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=_demo_args("unused"),
        run=False,
    )
    batch = next(iter(cli.datamodule.dataloader("train", rank=0, world_size=2)))
    with torch.no_grad():
        losses = {w: float(cli.model.model.loss(batch, w)) for w in cli.model.granularities}
    return cli, losses


@pytest.mark.distributed
@pytest.mark.slow
def test_main_fit_under_fsdp_x_tp_starts_from_the_one_process_loss_and_resumes_exactly(
    tmp_path, one_process_start
):
    """configs/strategy/fsdp_tp.yaml on 2 devices of one node: tensor parallelism over both.
    Its first loss is the one-process loss; its distributed checkpoint loads on one process
    (load_model) and gives the logged validation loss again; interrupted and resumed mid-epoch
    from that checkpoint it takes the same next steps as without the interruption."""
    from lit_matmamba.training import load_model

    cli, expected = one_process_start
    straight = _main_fit(tmp_path, "straight", strategy="fsdp_tp")
    for width, loss in expected.items():
        assert _losses(straight, f"train/loss/w{width}")[0] == pytest.approx(loss, rel=1e-5)
    assert os.path.isfile(os.path.join(straight, "mixnmatch.png"))

    checkpoint = os.path.join(straight, "checkpoints", "last.ckpt")
    assert os.path.isdir(checkpoint)  # one file per rank
    model = load_model(checkpoint)
    batches = list(cli.datamodule.dataloader("val", rank=0, world_size=2))[:2]
    with torch.no_grad():
        tokens = sum(b[:, 1:].numel() for b in batches)
        val = sum(float(model.loss(b, 16)) * b[:, 1:].numel() for b in batches) / tokens
    assert val == pytest.approx(_losses(straight, "val/loss/w16")[3], rel=1e-5)

    interrupted = _main_fit(
        tmp_path, "interrupted", "--trainer.callbacks+=stop_at.StopAt", strategy="fsdp_tp"
    )
    assert sorted(_losses(interrupted)) == [0, 1]
    resumed = _main_fit(
        tmp_path,
        "resumed",
        f"--ckpt_path={os.path.join(interrupted, 'checkpoints', 'last.ckpt')}",
        strategy="fsdp_tp",
    )
    after = _losses(resumed)
    assert sorted(after) == [2, 3]
    for step in (2, 3):  # step 3 reads the restored optimizer state and learning-rate schedule
        assert after[step] == pytest.approx(_losses(straight)[step], rel=1e-6), step


@pytest.mark.distributed
@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_under_ddp_and_fsdp(tmp_path, one_process_start):
    """A one-process run interrupted after 2 steps (a single-file checkpoint) continues on 2
    processes under configs/strategy/ddp.yaml and fsdp.yaml: the first loss is the checkpoint's
    model's on rank 0's batch, and the next one, which reads the restored optimizer state, is the
    same under both. Every shipped callback runs on both (the Mix'n'Match curve is drawn)."""
    from itertools import islice

    from lit_matmamba.training import load_model

    cli, _ = one_process_start
    one = _main_fit(tmp_path, "one", "--trainer.callbacks+=stop_at.StopAt", devices=1)
    checkpoint = os.path.join(one, "checkpoints", "last.ckpt")
    assert os.path.isfile(checkpoint)
    batch = next(islice(cli.datamodule.dataloader("train", rank=0, world_size=2), 2, None))
    with torch.no_grad():
        model = load_model(checkpoint)
        expected = {w: float(model.loss(batch, w)) for w in cli.model.granularities}
    runs = {
        name: _main_fit(tmp_path, name, f"--ckpt_path={checkpoint}", strategy=name)
        for name in ("ddp", "fsdp")
    }
    for name, run in runs.items():
        for width, loss in expected.items():
            assert _losses(run, f"train/loss/w{width}")[2] == pytest.approx(loss, rel=1e-5), (name, width)
        assert os.path.isfile(os.path.join(run, "mixnmatch.png"))  # drawn on rank 0, no deadlock
    assert _losses(runs["fsdp"])[3] == pytest.approx(_losses(runs["ddp"])[3], rel=1e-5)


@pytest.mark.distributed
@pytest.mark.slow
def test_the_vision_demo_trains_under_fsdp_with_every_shipped_callback(tmp_path):
    """configs/vision_demo.yaml on 2 processes under fsdp.yaml: its callbacks (charts, throughput,
    the Mix'n'Match curve by top-1, checkpoints) run on every rank without a deadlock, and the
    distributed checkpoint loads on one process."""
    from lit_matmamba import MatMambaVision
    from lit_matmamba.io import load_model
    from lit_matmamba.plots import read_scalars

    run = _main_fit(tmp_path, "vision", strategy="fsdp", demo="vision_demo")
    assert os.path.isfile(os.path.join(run, "mixnmatch.png"))
    logged = read_scalars(run)
    top1 = dict(logged["val/top1/w16"])
    assert len(top1) == 2 and all(0 <= v <= 1 for v in top1.values())  # validated at steps 2 and 4
    assert "perf/tokens_per_sec" in logged
    assert isinstance(load_model(os.path.join(run, "checkpoints", "last.ckpt")), MatMambaVision)
