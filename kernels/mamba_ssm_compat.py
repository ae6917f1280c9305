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
import sys
import types
import warnings
from collections.abc import Callable

import torch

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
    them, so that each tunes the kernels for its own calls, as it would alone. (Keying on the head
    count too, so that each width of a nested model tunes for itself, measures no faster in a joint
    step.) Configurations pinned by `pin_ssd_configs` stay, unless `pins` is False: then those keys
    tune too, until the next clearing that keeps them."""
    tuners = list(_autotuners(_loaded_modules()))
    for tuner in tuners:
        tuner.cache.clear()
    if pins:
        _apply_pins()
    return len(tuners)


# kernel name -> [(autotuning key, config)]: the pins `pin_ssd_configs` made in this process, kept
# so that `clear_autotuning` restores them and the next `pin_ssd_configs` can remove them.
_PINS: dict[str, list[tuple[tuple, object]]] = {}


def pin_ssd_configs(choice: str = "auto", device: int | None = None) -> int:
    """Sets the warps and pipeline stages mamba-ssm's SSD kernels run with in this process; returns
    how many (kernel, autotuning key) pairs are pinned.

    Why: mamba-ssm's autotuning lists offer its SSD kernels few warps x stages combinations, and at
    the LM presets' calls others are faster (`kernels/ssd/tuned_configs.py`); tuning a longer list
    at every start would cost minutes. A pinned configuration is one of the kernel's own (same block
    sizes, same arithmetic) with other warps and stages, used at its autotuning key only; other keys
    autotune as usual.

    Args:
        choice: "auto": the table shipped for this GPU model (`kernels/ssd/tuned_configs.py`, by
            `torch.cuda.get_device_name(device)`), nothing on GPU models without one. "off":
            mamba-ssm's own autotuning everywhere. Anything else: the path of a JSON table, as
            `lit_matmamba.bench.tune` writes it (kernel name -> [{"key": [...], "kwargs": {block
            sizes}, "num_warps": w, "num_stages": s}, ...]).
        device: the CUDA device whose model "auto" looks up; the current one if None.

    Each call replaces the pins of the previous one, so a second call with the same choice leaves
    the same state. Without CUDA or without mamba-ssm's Triton kernels, "auto" and "off" pin nothing
    and return 0; a path there raises ImportError. A table that cannot be read, or names a kernel
    or block sizes the installed mamba-ssm lacks, raises ValueError (naming the path) and leaves the
    pins as they were; the shipped table, in that case, is skipped with a warning. Call it once at
    setup, before the first forward (the training module and the bench commands do).
    """
    if choice == "off":
        return _replace_pins({})
    if choice == "auto":
        if not torch.cuda.is_available():
            return _replace_pins({})
        try:
            get_ssd_internals()
        except ImportError:
            return _replace_pins({})
        from .ssd.tuned_configs import TABLES

        name = torch.cuda.get_device_name(device)
        try:
            pins = _resolve_pins(TABLES.get(name, {}))
        except ValueError as e:
            warnings.warn(
                f"the SSD configurations shipped for {name} do not fit this mamba-ssm, which autotunes "
                f"instead: {e}",
                stacklevel=2,
            )
            pins = {}
        return _replace_pins(pins)
    try:
        with open(choice) as f:
            table = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"SSD configuration table {choice!r}: not a readable JSON file ({e})") from e
    try:
        get_ssd_internals()
    except ImportError as e:
        raise ImportError(f"SSD configuration table {choice!r} pins mamba-ssm's kernels: {e}") from e
    try:
        pins = _resolve_pins(table)
    except ValueError as e:
        raise ValueError(f"SSD configuration table {choice!r}: {e}") from e
    return _replace_pins(pins)


def _resolve_pins(table: object) -> dict[str, list[tuple[tuple, object]]]:
    """The pins a table asks for, checked against the loaded kernels; applies nothing."""
    if not isinstance(table, dict):
        raise ValueError(f"expected an object of kernel names, got {type(table).__name__}")
    if not table:
        return {}
    tuners = autotuners_by_name()
    pins: dict[str, list[tuple[tuple, object]]] = {}
    for name, entries in table.items():
        tuner = tuners.get(name)
        if tuner is None:
            raise ValueError(
                f"no autotuned mamba-ssm kernel named {name!r} (have: {', '.join(sorted(tuners))})"
            )
        if not isinstance(entries, list):
            raise ValueError(f"{name}: expected a list of entries, got {type(entries).__name__}")
        for entry in entries:
            try:
                key, kwargs = tuple(entry["key"]), entry["kwargs"]
                num_warps, num_stages = int(entry["num_warps"]), int(entry["num_stages"])
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(
                    f"{name}: each entry needs key, kwargs, num_warps and num_stages, got {entry!r}"
                ) from e
            base = next((c for c in tuner.configs if c.kwargs == kwargs), None)
            if base is None:
                raise ValueError(f"{name} has no configuration with block sizes {kwargs}")
            pins.setdefault(name, []).append((key, config_variant(base, num_warps, num_stages)))
    return pins


def _replace_pins(pins: dict[str, list[tuple[tuple, object]]]) -> int:
    """Removes this process's pins from the autotuners (those keys tune again), then applies `pins`."""
    if _PINS:
        tuners = autotuners_by_name()
        for name, old in _PINS.items():
            cache = tuners[name].cache
            for key, config in old:
                if cache.get(key) is config:
                    del cache[key]
        _PINS.clear()
    _PINS.update(pins)
    _apply_pins()
    return sum(map(len, pins.values()))


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


def _private(module: str, attr: str):
    """mamba_ssm.ops.triton.<module>.<attr>, or an ImportError naming it (private API)."""
    found = getattr(_import(f"ops.triton.{module}"), attr, None)
    if found is None:
        raise ImportError(f"mamba_ssm.ops.triton.{module}.{attr} not found (another mamba-ssm version?)")
    return found
