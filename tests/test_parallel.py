"""Scale-out (training/parallel/): head placement, sharded forward and backward against the
unsharded model, checkpoint conversions, gradient reduction and clipping across shards.

The multi-process tests start 2 or 4 processes on the CPU (gloo) with torch.multiprocessing; each
runs several checks, to pay the start-up once. Models are float64, so "equal" is tight.
"""

from __future__ import annotations

import copy
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
from lit_matmamba.training.parallel.tensor_parallel import tensor_parallel_layouts

VOCAB = 97
# lm-tiny with headdim 4: 32 heads at the full width 64, so widths 64/32/16/8 have 32/16/8/4 heads
# and every granularity splits over 4 ranks.
CONFIG = dict(vocab_size=VOCAB, headdim=4)
WIDTHS = [64, 32, 16, 8, [64, 8]]  # the granularities and a Mix'n'Match width


def tiny(seed: int = 0) -> MatMambaLM:
    torch.manual_seed(seed)
    return MatMambaLM(MatMambaConfig.from_name("lm-tiny", **CONFIG)).double()


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
        opt = torch.optim.AdamW(parallel.split_param_groups([{"params": list(m.parameters())}]), lr=1e-2)
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
    fresh = torch.optim.AdamW(parallel.split_param_groups([{"params": list(model.parameters())}]), lr=1e-2)
    parallel.register_optimizer(fresh, model)
    state = get_optimizer_state_dict(model, fresh)
    dcp.load(state, checkpoint_id=opt_path)
    set_optimizer_state_dict(model, fresh, state)
    for p in model.parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(_full(fresh.state[p][key]), _full(opt.state[p][key]))


def _check_joint_step(rank: int) -> None:
    """The joint step under FSDP2 reduces gradients once per optimizer step, however many widths;
    clipping sees the global norm across shards (FSDP2, tensor parallelism, both)."""
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

    ref = tiny()
    everything = torch.randint(0, VOCAB, (4, 17), generator=torch.Generator().manual_seed(9))
    sum(0.5 * ref.loss(part, w) for part in everything.chunk(2) for w in (64, 8)).div(2).backward()
    expected = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e-3)
    clipped = {n: p.grad.clone() for n, p in ref.named_parameters()}
    for dp, tp in ((2, 1), (1, 2)):
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


def _two_processes(rank: int, tmp: str) -> None:
    for dp, tp in ((2, 1), (1, 2)):
        _check_equals_unsharded(dp, tp, rank)
        _check_checkpoint_conversions(dp, tp, rank, tmp)
    _check_joint_step(rank)


def _four_processes(rank: int, tmp: str) -> None:
    for dp, tp in ((1, 4), (2, 2)):
        _check_equals_unsharded(dp, tp, rank)
        _check_checkpoint_conversions(dp, tp, rank, tmp)


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp2_and_tp2_equal_the_unsharded_model_and_convert_checkpoints_exactly(tmp_path):
    spawn(2, _two_processes, str(tmp_path))


@pytest.mark.distributed
@pytest.mark.slow
def test_tp4_and_the_2x2_mesh_equal_the_unsharded_model_and_convert_checkpoints_exactly(tmp_path):
    spawn(4, _four_processes, str(tmp_path))
