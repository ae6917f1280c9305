"""The one place that imports mamba-ssm's Triton kernels.

Why a shim: mamba-ssm's package `__init__` (2.3.x and earlier) unconditionally imports the Mamba-1
CUDA extension (`selective_scan_cuda`, via `mamba_ssm.ops.selective_scan_interface`) and the model
classes. That extension is often not built (a `--no-build-isolation` install against another torch,
a CPU-only machine) and the import fails, although the pure-Triton modules we need
(`mamba_ssm.ops.triton.*`) import fine. So when `mamba_ssm` is not imported yet, we register an
empty package module for it (the real package's directory as `__path__`, its `__init__` never
executed): `import mamba_ssm.ops.triton.ssd_combined` then finds the submodules without running it.

Side effect, by design: for the rest of the process `import mamba_ssm` returns that empty package
(its submodules import normally; the top-level re-exports such as `mamba_ssm.Mamba2` are absent).
If `mamba_ssm` was imported before (it worked), it is used as it is.

Importing this module imports nothing from mamba-ssm; the getters do, and raise an ImportError that
says how to install it.
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import json
import os
import sys
import types
from collections.abc import Callable

_PACKAGE = "mamba_ssm"
_INSTALL_HINT = (
    "mamba-ssm's Triton kernels are needed here (the GPU SSD path; its CUDA extensions are not used), "
    "so install it without building them: `MAMBA_SKIP_CUDA_BUILD=TRUE pip install --no-build-isolation "
    "--no-deps mamba-ssm` next to torch, triton and einops (see the README, 'GPU install')."
)


def _import(submodule: str):
    """Import `mamba_ssm.<submodule>` without executing mamba_ssm/__init__.py (see the module docstring)."""
    if _PACKAGE not in sys.modules:
        spec = importlib.util.find_spec(_PACKAGE)  # locates the package, executes nothing
        if spec is None or spec.submodule_search_locations is None:
            raise ImportError(f"`{_PACKAGE}` is not installed. {_INSTALL_HINT}")
        # module_from_spec sets __path__, __spec__, __file__ as for the real package; we never call
        # spec.loader.exec_module, so the package's __init__ does not run.
        sys.modules[_PACKAGE] = importlib.util.module_from_spec(spec)
    name = f"{_PACKAGE}.{submodule}"
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(f"could not import `{name}`: {e}. {_INSTALL_HINT}") from e


def get_mamba_chunk_scan_combined() -> Callable:
    """mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined (the chunked SSD scan, with autograd)."""
    return _import("ops.triton.ssd_combined").mamba_chunk_scan_combined


def get_rmsnorm_fn() -> Callable:
    """mamba_ssm.ops.triton.layernorm_gated.rmsnorm_fn (gated RMSNorm; a baseline for ours)."""
    return _import("ops.triton.layernorm_gated").rmsnorm_fn


@functools.cache
def get_chunk_scan_bwd_dcb_kernel():
    """mamba_ssm.ops.triton.ssd_chunk_scan._chunk_scan_bwd_dcb_kernel (autotuned Triton kernel; private
    API), for the experimental one-pass dCB/ddA (`kernels/ssd/dcb_dda.py`)."""
    return _private("ssd_chunk_scan", "_chunk_scan_bwd_dcb_kernel", ": unset LIT_MATMAMBA_FUSED_DDA")


def get_selective_state_update() -> Callable:
    """mamba_ssm.ops.triton.selective_state_update.selective_state_update (one decoding step)."""
    return _import("ops.triton.selective_state_update").selective_state_update


_SSD_INTERNALS = {  # our name: (module under mamba_ssm.ops.triton, function)
    "chunk_cumsum_fwd": ("ssd_chunk_state", "_chunk_cumsum_fwd"),
    "chunk_cumsum_bwd": ("ssd_chunk_state", "_chunk_cumsum_bwd"),
    "chunk_state_fwd": ("ssd_chunk_state", "_chunk_state_fwd"),
    "chunk_state_bwd_db": ("ssd_chunk_state", "_chunk_state_bwd_db"),
    "state_passing_fwd": ("ssd_state_passing", "_state_passing_fwd"),
    "state_passing_bwd": ("ssd_state_passing", "_state_passing_bwd"),
    "bmm_chunk_fwd": ("ssd_bmm", "_bmm_chunk_fwd"),
    "bmm_chunk_bwd": ("ssd_bmm", "_bmm_chunk_bwd"),
    "chunk_scan_fwd": ("ssd_chunk_scan", "_chunk_scan_fwd"),
    "chunk_scan_bwd_dstates": ("ssd_chunk_scan", "_chunk_scan_bwd_dstates"),
    "chunk_scan_bwd_dC": ("ssd_chunk_scan", "_chunk_scan_bwd_dC"),
    "chunk_scan_bwd_dcb": ("ssd_chunk_scan", "_chunk_scan_bwd_dcb"),
    "chunk_scan_bwd_ddAcs_stable": ("ssd_chunk_scan", "_chunk_scan_bwd_ddAcs_stable"),
    "chunk_scan_chunk_state_bwd_dx": ("ssd_combined", "_chunk_scan_chunk_state_bwd_dx"),
}


@functools.cache
def get_ssd_internals() -> types.SimpleNamespace:
    """The private pieces of mamba-ssm's chunked SSD (forward and backward steps), for the fused mixer
    core (`kernels/ssd/fused.py`). Private API: raises ImportError when one is missing, and the caller
    then uses the public `mamba_chunk_scan_combined`."""
    return types.SimpleNamespace(**{name: _private(*where) for name, where in _SSD_INTERNALS.items()})


def clear_autotuning(pins: bool = True) -> int:
    """Forgets the configurations mamba-ssm's loaded Triton kernels have chosen, so that the next
    calls tune afresh; returns how many autotuned kernels there are.

    mamba-ssm keys its SSD kernels' autotuning on chunk size, head dim and state size only (not on
    the head count, batch or strides), so the first model to call them in a process chooses for
    every later one. A benchmark timing several models in one process clears the choices between
    them, so that each tunes the kernels for its own calls, as it would alone. (Adding the head count
    to the keys, so that each width of a nested model tunes for itself, was timed in the sixth run
    and made no difference to the joint step; it was removed.) Configurations pinned by
    `pin_configs` stay, unless `pins` is False: then those keys tune too, until the next clearing."""
    tuners = list(_autotuners(_loaded_modules()))
    for tuner in tuners:
        tuner.cache.clear()
    if pins:
        _apply_pins()
    return len(tuners)


# kernel name -> [(autotuning key, config)], kept so that clear_autotuning does not forget them.
_PINS: dict[str, list[tuple[tuple, object]]] = {}


def pin_configs(table: dict[str, list[dict]]) -> int:
    """Makes mamba-ssm's autotuned SSD kernels use the given configurations at the given autotuning
    keys instead of tuning there; returns how many (kernel, key) pairs were pinned. Other keys tune
    as usual, and `clear_autotuning` keeps the pins.

    `table` is what `scripts/gpu_ssd_tune.py` writes: kernel name ->
    [{"key": [...], "kwargs": {...}, "num_warps": w, "num_stages": s}, ...]. A pinned configuration is
    one of the kernel's own (same block sizes, so its pre-hook too) with its warps and stages set.
    Why: a configuration outside mamba-ssm's lists can be faster at a given key (BENCHMARKS.md,
    seventh run), and tuning a longer list at every start would cost minutes.
    """
    get_ssd_internals()  # imports the SSD modules
    tuners = autotuners_by_name()
    pins: dict[str, list[tuple[tuple, object]]] = {}
    for name, entries in table.items():
        tuner = tuners.get(name)
        if tuner is None:
            raise ValueError(
                f"no autotuned mamba-ssm kernel named {name!r} (have: {', '.join(sorted(tuners))})"
            )
        for entry in entries:
            base = next((c for c in tuner.configs if c.kwargs == entry["kwargs"]), None)
            if base is None:
                raise ValueError(f"{name} has no configuration with block sizes {entry['kwargs']}")
            config = config_variant(base, int(entry["num_warps"]), int(entry["num_stages"]))
            pins.setdefault(name, []).append((tuple(entry["key"]), config))
    _PINS.update(pins)
    _apply_pins()
    return sum(map(len, pins.values()))


@functools.cache
def use_tuned_configs(device_name: str) -> int:
    """Pins (`pin_configs`) the configurations tuned for this GPU model (`kernels/ssd/tuned_configs.py`),
    once per process; returns how many (kernel, key) pairs were pinned. The environment variable
    LIT_MATMAMBA_SSD_CONFIGS replaces the table: a JSON file's path (what `scripts/gpu_ssd_tune.py`
    writes), or `off` for mamba-ssm's own autotuning everywhere."""
    from .ssd.tuned_configs import TABLES

    choice = os.environ.get("LIT_MATMAMBA_SSD_CONFIGS", "").strip()
    if choice.lower() == "off":
        return 0
    if choice:
        try:
            with open(choice) as f:
                table = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"LIT_MATMAMBA_SSD_CONFIGS={choice!r}: not a readable JSON table ({e})") from e
    else:
        table = TABLES.get(device_name, {})
    return pin_configs(table) if table else 0


def config_variant(base, num_warps: int, num_stages: int):
    """A copy of a triton Config with other warps and stages; its block sizes and pre-hook (e.g.
    zeroing an accumulated output) stay."""
    config = copy.copy(base)
    config.num_warps, config.num_stages = num_warps, num_stages
    return config


def autotuners_by_name() -> dict:
    """Kernel name -> triton Autotuner, for mamba-ssm's loaded Triton modules."""
    return {t.base_fn.__name__: t for t in _autotuners(_loaded_modules())}


def _apply_pins() -> None:
    if not _PINS:
        return
    tuners = autotuners_by_name()
    for name, pins in _PINS.items():
        for key, config in pins:
            tuners[name].cache[key] = config


def _loaded_modules() -> list[types.ModuleType]:
    return [m for name, m in list(sys.modules.items()) if name.startswith(f"{_PACKAGE}.ops.triton.")]


def _autotuners(modules):
    """The triton Autotuner of each autotuned kernel among the modules' attributes."""
    from triton.runtime.autotuner import Autotuner

    for module in modules:
        for obj in vars(module).values():
            while not isinstance(obj, Autotuner) and hasattr(obj, "fn"):  # e.g. heuristics around it
                obj = obj.fn
            if isinstance(obj, Autotuner):
                yield obj


def _private(module: str, attr: str, hint: str = ""):
    """mamba_ssm.ops.triton.<module>.<attr>, or an ImportError naming it (private API)."""
    found = getattr(_import(f"ops.triton.{module}"), attr, None)
    if found is None:
        raise ImportError(
            f"mamba_ssm.ops.triton.{module}.{attr} not found (another mamba-ssm version?){hint}"
        )
    return found
