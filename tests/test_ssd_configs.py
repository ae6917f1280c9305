"""Which configurations mamba-ssm's SSD kernels run with: `pin_ssd_configs`, `clear_autotuning`,
and the tune benchmark's choice of a table (`lit_matmamba.bench.tune`).

On CPU the pins are checked in mamba-ssm's autotuners' caches (no kernel runs); on a GPU the pinned
configurations run and give mamba-ssm's own results.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import types
import warnings

import pytest
import torch
from kernel_testing import requires_triton

from lit_matmamba import MatMambaConfig, MatMambaLM
from lit_matmamba.bench import tune
from lit_matmamba.kernels import mamba_ssm_compat as compat
from lit_matmamba.kernels import pin_ssd_configs
from lit_matmamba.kernels.ssd.tuned_configs import TABLES

needs_mamba_ssm = [
    requires_triton,
    pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is None, reason="needs mamba-ssm"),
]
H200 = TABLES["NVIDIA H200"]


@pytest.fixture
def fresh_pins(monkeypatch):
    """No pins before the test; afterwards, none left in mamba-ssm's autotuners for later tests."""
    monkeypatch.setattr(compat, "_PINS", {})
    yield
    pin_ssd_configs("off")
    if "mamba_ssm" in sys.modules:
        compat.clear_autotuning(pins=False)


@pytest.fixture
def on_a_gpu(monkeypatch):
    """What `pin_ssd_configs("auto")` sees of CUDA, faked on CPU: returns a setter of the GPU model."""
    model = {"name": "NVIDIA H200"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: model["name"])
    return lambda name: model.update(name=name)


def pinned_state() -> dict:
    """{kernel: {key: (block sizes, warps, stages)}} of this process's pins, as the autotuners hold them."""
    tuners = compat.autotuners_by_name()
    state = {}
    for name, pins in compat._PINS.items():
        for key, config in pins:
            assert tuners[name].cache[key] is config, (name, key)
            state.setdefault(name, {})[key] = (config.kwargs, config.num_warps, config.num_stages)
    return state


def write_table(path, table) -> str:
    path.write_text(json.dumps(table))
    return str(path)


def test_without_cuda_auto_and_off_pin_nothing(monkeypatch, fresh_pins):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pin_ssd_configs() == 0
    assert pin_ssd_configs("auto") == 0
    assert pin_ssd_configs("off") == 0
    assert compat._PINS == {}


@pytest.fixture
def no_mamba_ssm(monkeypatch, tmp_path):
    """mamba-ssm neither imported nor importable during the test."""
    for name in [m for m in sys.modules if m == "mamba_ssm" or m.startswith("mamba_ssm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "path", [str(tmp_path / "empty")])
    compat.get_ssd_internals.cache_clear()  # it would return the kernels it found before
    yield
    compat.get_ssd_internals.cache_clear()
    for name in [m for m in sys.modules if m == "mamba_ssm" or m.startswith("mamba_ssm.")]:
        del sys.modules[name]


def test_without_mamba_ssm_auto_pins_nothing_and_a_path_says_why(
    tmp_path, on_a_gpu, fresh_pins, no_mamba_ssm
):
    assert pin_ssd_configs("auto") == 0
    assert pin_ssd_configs("off") == 0
    path = write_table(tmp_path / "table.json", {"_chunk_scan_fwd_kernel": []})
    with pytest.raises(ImportError, match=r"table.json.*pins mamba-ssm's kernels.*MAMBA_SKIP_CUDA_BUILD"):
        pin_ssd_configs(path)


@pytest.mark.usefixtures("fresh_pins")
class TestWithMambaSsm:
    pytestmark = needs_mamba_ssm

    def test_auto_pins_the_shipped_table_of_the_gpu_model(self, on_a_gpu):
        """The shipped table fits the installed mamba-ssm (every kernel and block size exists, no
        warning); each pin is the table's; calling again leaves the same state; a GPU model without
        a table pins nothing and removes the pins."""
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            n = pin_ssd_configs("auto")
        assert n == sum(map(len, H200.values())) > 0
        state = pinned_state()
        expected = {
            name: {tuple(e["key"]): (e["kwargs"], e["num_warps"], e["num_stages"]) for e in entries}
            for name, entries in H200.items()
        }
        assert state == expected
        assert pin_ssd_configs("auto") == n and pinned_state() == state
        on_a_gpu("a GPU without a table")
        assert pin_ssd_configs("auto") == 0 and compat._PINS == {}
        tuners = compat.autotuners_by_name()
        for name, entries in H200.items():
            assert not {tuple(e["key"]) for e in entries} & set(tuners[name].cache), name

    def test_off_removes_the_pins_and_their_keys_tune_again(self, on_a_gpu):
        pin_ssd_configs("auto")
        tuners = compat.autotuners_by_name()
        name, entry = "_chunk_scan_fwd_kernel", H200["_chunk_scan_fwd_kernel"][0]
        other = ("another", "key")
        tuners[name].cache[other] = tuners[name].configs[0]  # a key mamba-ssm tuned: not ours to remove
        assert pin_ssd_configs("off") == 0 and compat._PINS == {}
        assert tuple(entry["key"]) not in tuners[name].cache and other in tuners[name].cache
        compat.clear_autotuning()  # no pin comes back
        assert tuners[name].cache == {}

    def test_a_path_table_is_applied_kept_by_clearing_and_replaced(self, tmp_path):
        """A pinned configuration is the kernel's own (same block sizes and pre-hook) with the table's
        warps and stages, at its key only; clearing the choices keeps it unless asked not to; the
        next choice replaces it."""
        compat.get_ssd_internals()  # imports the SSD modules (without mamba-ssm's package __init__)
        dx = importlib.import_module(
            "mamba_ssm.ops.triton.ssd_combined"
        )._chunk_scan_chunk_state_bwd_dx_kernel
        base = dx.configs[3]
        assert base.pre_hook is not None  # zeroes ddt: it must survive the pin
        key = [128, 24, 128, "torch.bfloat16"]
        entry = dict(key=key, kwargs=dict(base.kwargs), num_warps=8, num_stages=1)
        path = write_table(tmp_path / "table.json", {dx.base_fn.__name__: [entry]})
        dx.cache.clear()
        assert pin_ssd_configs(path) == 1
        pinned = dx.cache[tuple(key)]
        assert (pinned.kwargs, pinned.num_warps, pinned.num_stages) == (base.kwargs, 8, 1)
        assert pinned.pre_hook is base.pre_hook and (base.num_warps, base.num_stages) != (8, 1)
        assert len(dx.cache) == 1
        assert pin_ssd_configs(path) == 1 and len(dx.cache) == 1  # the same state again
        compat.clear_autotuning()
        assert dx.cache[tuple(key)] is compat._PINS[dx.base_fn.__name__][0][1]
        compat.clear_autotuning(pins=False)
        assert dx.cache == {}
        compat.clear_autotuning()  # pins come back at the next clearing that keeps them
        assert len(dx.cache) == 1
        other = write_table(tmp_path / "other.json", {dx.base_fn.__name__: [dict(entry, key=[1, 2, 3])]})
        assert pin_ssd_configs(other) == 1
        assert list(dx.cache) == [(1, 2, 3)]

    @pytest.mark.parametrize(
        "content, message",
        [
            (None, "missing.json.*not a readable JSON file"),
            ("{not json", "bad.json.*not a readable JSON file"),
            ("[]", "bad.json.*expected an object of kernel names, got list"),
            ('{"not_a_kernel": []}', "bad.json.*no autotuned mamba-ssm kernel named 'not_a_kernel'"),
            (
                '{"_chunk_scan_fwd_kernel": [{"key": [1], "kwargs": {"BLOCK_SIZE_M": 3}, "num_warps": 4,'
                ' "num_stages": 2}]}',
                "bad.json.*_chunk_scan_fwd_kernel has no configuration with block sizes",
            ),
            ('{"_chunk_scan_fwd_kernel": [{"key": [1]}]}', "bad.json.*needs key, kwargs, num_warps and num_stages"),
            ('{"_chunk_scan_fwd_kernel": {"key": [1]}}', "bad.json.*expected a list of entries"),
        ],
        ids=["missing-file", "bad-json", "not-an-object", "unknown-kernel", "unknown-block-sizes",
             "incomplete-entry", "entries-not-a-list"],
    )  # fmt: skip
    def test_a_bad_table_raises_naming_the_path_and_changes_nothing(
        self, tmp_path, on_a_gpu, content, message
    ):
        assert pin_ssd_configs("auto") > 0
        before = pinned_state()
        path = tmp_path / ("missing.json" if content is None else "bad.json")
        if content is not None:
            path.write_text(content)
        with pytest.raises(ValueError, match=message):
            pin_ssd_configs(str(path))
        assert pinned_state() == before

    def test_a_shipped_table_that_does_not_fit_is_skipped_with_a_warning(self, monkeypatch, on_a_gpu):
        monkeypatch.setitem(TABLES, "NVIDIA H200", {"_no_such_kernel": []})
        with pytest.warns(UserWarning, match="shipped for NVIDIA H200 do not fit this mamba-ssm"):
            assert pin_ssd_configs("auto") == 0
        assert compat._PINS == {}

    def test_clear_autotuning_forgets_mamba_ssm_choices(self, monkeypatch):
        """Benchmarks clear the autotuners' choices between models (each tunes for its own calls):
        plain autotuned kernels and those with heuristics around the autotuner (mamba-ssm has both)."""
        import triton

        compat.get_ssd_internals()  # imports the SSD modules
        scan = importlib.import_module("mamba_ssm.ops.triton.ssd_chunk_scan")
        scan._chunk_scan_fwd_kernel.cache[("a", "key")] = scan._chunk_scan_fwd_kernel.configs[0]
        tuned = triton.autotune([triton.Config({})], key=["n"])(triton.jit(_kernel_for_the_autotuner))
        wrapped = types.SimpleNamespace(
            kernel=triton.heuristics({"unused": lambda args: 0})(tuned), other=len
        )
        monkeypatch.setitem(sys.modules, "mamba_ssm.ops.triton.wrapped_for_the_test", wrapped)
        tuned.cache[("b",)] = tuned.configs[0]
        assert compat.clear_autotuning() >= len(compat._SSD_INTERNALS) + 1
        assert scan._chunk_scan_fwd_kernel.cache == {} and tuned.cache == {}


def _kernel_for_the_autotuner(n):
    """Never launched. A `def`, not a lambda: outside the interpreter (on a GPU) `triton.jit` finds
    the kernel's source by its `def` line, and fails on a lambda."""


# ---------------------------------------------------------------------------------------------------
# the tune benchmark's choice


def test_tune_chooses_one_config_for_all_widths():
    """The default is what the autotuner picks at full width and runs at every width; the best
    minimises the call-weighted sum over widths; pins only beyond the minimum gain."""
    cid = lambda w, s: f'{{"kwargs": {{"M": 64}}, "num_stages": {s}, "num_warps": {w}}}'  # noqa: E731
    a, b, c = cid(4, 3), cid(8, 1), cid(2, 2)
    key, widths = (128, 24), [768, 96]
    timings = {
        ("default", "k", key, 768): {a: 1.0, cid(4, 4): 1.1},
        ("default", "k", key, 96): {a: 0.5, cid(4, 4): 0.2},  # the default still runs a here
        ("refined", "k", key, 768): {a: 1.0, b: 0.7, c: 0.6},
        ("refined", "k", key, 96): {a: 0.5, b: 0.2, c: 0.5},  # c is best at 768 only
        ("default", "slow", key, 768): {a: 1.0},
        ("default", "slow", key, 96): {a: 1.0},
        ("refined", "slow", key, 768): {b: 0.99},
        ("refined", "slow", key, 96): {b: 0.99},
    }
    calls = {("k", key, 768): 2, ("k", key, 96): 2, ("slow", key, 768): 1, ("slow", key, 96): 1}
    report, table = tune.choose(timings, calls, widths, min_gain=0.03)
    by_kernel = {e["kernel"]: e for e in report}
    k = by_kernel["k"]
    assert k["default_config"]["num_warps"] == 4 and k["step_ms_default"] == pytest.approx(3.0)
    assert (k["best_config"]["num_warps"], k["best_config"]["num_stages"]) == (8, 1)  # 1.8 < 2.2 (c)
    assert k["step_ms_best"] == pytest.approx(1.8)
    assert by_kernel["slow"]["step_ms_best"] == pytest.approx(1.98)  # 1% faster: reported, not pinned
    assert table == {"k": [dict(key=[128, 24], kwargs={"M": 64}, num_warps=8, num_stages=1)]}


def test_tune_widths_are_the_presets_with_the_full_width_first():
    assert tune.check_widths(2048, None) == [2048, 1024, 512, 256]
    assert tune.check_widths(2048, [2048]) == [2048]
    assert tune.check_widths(768, [768, 96]) == [768, 96]
    for bad in ([], [1024, 2048], [2048, 100]):
        with pytest.raises(ValueError, match="full width 2048 first"):
            tune.check_widths(2048, bad)


def test_tune_checks_its_arguments_before_it_needs_a_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="unknown preset"):
        tune.tune(preset="no-such-preset")
    with pytest.raises(ValueError, match="full width 64 first"):
        tune.tune(preset="lm-tiny", widths=[32])
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        tune.tune(preset="lm-tiny", out=str(tmp_path / "t.json"))
    assert not (tmp_path / "t.json").exists()


# ---------------------------------------------------------------------------------------------------
# GPU: the pinned configurations against mamba-ssm's own


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is None, reason="needs mamba-ssm (GPU install)")
@pytest.mark.parametrize("d_model, headdim", [(96, 24), (256, 64)], ids=["headdim24", "headdim64"])
@pytest.mark.parametrize("width", [None, "half", "eighth", "mixnmatch"])
def test_shipped_ssd_configs_match_mamba_ssms_own(d_model, headdim, width, tmp_path, fresh_pins):
    """The warps and stages shipped for the H200 (kernels/ssd/tuned_configs.py), pinned from a table
    file on any GPU, at the LM presets' autotuning keys (chunk 128, state 128, head dim 24 or 64, bf16
    autocast): each pinned kernel's calls use the pinned configuration, and the loss and every
    gradient equal those of mamba-ssm's own autotuned configurations (same block sizes: only the
    pipelining and the warps differ), at each width; and the loss that of the reference path."""
    cfg = dict(d_model=d_model, n_layer=2, vocab_size=1000, d_state=128, headdim=headdim, chunk_size=128)
    torch.manual_seed(0)
    fast = MatMambaLM(MatMambaConfig(**cfg, backend="triton")).cuda()
    ref = MatMambaLM(MatMambaConfig(**cfg, backend="reference")).cuda()
    ref.load_state_dict(fast.state_dict())
    w = {None: None, "half": d_model // 2, "eighth": d_model // 8}.get(width, [d_model, d_model // 8])
    ids = torch.randint(0, 1000, (2, 300), device="cuda")  # 300: not a multiple of the chunk size

    def loss_and_grads(model):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(ids, w)
        loss.backward()
        return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    assert pin_ssd_configs("off") == 0
    compat.clear_autotuning()  # mamba-ssm's own choices, tuned afresh for these calls
    own_loss, own_grads = loss_and_grads(fast)
    assert pin_ssd_configs(write_table(tmp_path / "h200.json", H200)) == sum(map(len, H200.values()))
    compat.clear_autotuning()  # forgets the choices above, keeps the pins
    pinned_loss, pinned_grads = loss_and_grads(fast)
    tuners = compat.autotuners_by_name()
    checked = 0
    for name, entries in H200.items():
        keys = {tuple(e["key"]) for e in entries}
        if any(headdim in k[:2] for k in keys):  # keys start with chunk size and head dim, either order
            assert set(tuners[name].cache) <= keys, f"{name} tuned a key instead of running its pin"
            checked += 1
    assert checked, "the table pins nothing at this head dim"
    assert abs(pinned_loss - own_loss) < 1e-3 * abs(own_loss)
    assert own_grads.keys() == pinned_grads.keys()
    for name, g in own_grads.items():
        assert rel(pinned_grads[name], g) < 1e-2, (name, rel(pinned_grads[name], g))
    ref_loss, _ = loss_and_grads(ref)
    assert abs(pinned_loss - ref_loss) < 2e-2 * abs(ref_loss)
