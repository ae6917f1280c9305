"""Tune the warps and pipeline stages of mamba-ssm's SSD kernels at a nested model's own calls, and
write the best as a table that `pin_ssd_configs(path)` applies.

mamba-ssm's autotuning lists offer its SSD kernels few warps x stages combinations, mostly 4 or 5
stages. This measures, with the autotuner's own timer, what other warps and stages (and, with
`all_blocks`, the other block sizes in the lists) give at a preset's calls:

1. default: at each width (mamba-ssm's choices cleared before each), one forward and backward with
   mamba-ssm's lists. Every kernel call is counted, and every configuration is timed.
2. refined: the block sizes each kernel chose at the full width, with every warps x stages
   combination; again each width.
3. For each kernel and key, the configuration with the least time summed over the widths (one key
   serves every width, so one configuration must serve them all), against what the default
   autotuner picks at the full width and then runs at every width. The predicted saving of a joint
   step is the sum over kernels and widths of (calls at that width) x (default - refined) time.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections import defaultdict
from pathlib import Path

import torch

from lit_matmamba import MatMambaConfig, MatMambaLM
from lit_matmamba.kernels import mamba_ssm_compat, pin_ssd_configs


def tune(
    preset: str = "lm-1.4b",
    batch: int = 8,
    seq: int = 1024,
    widths: list[int] | None = None,
    kernels: list[str] | None = None,
    all_blocks: bool = False,
    warps: list[int] | None = None,
    stages: list[int] | None = None,
    min_gain: float = 0.03,
    out: str = "ssd-tune.json",
) -> dict:
    """Measure warps x stages for mamba-ssm's SSD kernels at a preset's calls and write the table of
    the configurations worth pinning.

    The table (`out`) is what `pin_ssd_configs(out)` reads (the training module's `ssd_configs`
    argument); the full report, with every kernel's default and best time, goes beside it
    (`<out>.report.json`, e.g. ssd-tune.report.json) and comes back as a dict. Both are rewritten
    after each width of the refined phase, so a stopped run keeps the widths it finished. Compiling
    the variants takes most of the time: on an H200, one or two minutes a width and phase.

    Args:
        preset: Model preset whose calls to time (a name `MatMambaConfig.from_name` knows).
        batch: Sequences in a batch.
        seq: Tokens in a sequence.
        widths: The widths to time, the full width (d_model) first, each one of d_model / 1, 2, 4,
            8. None: all four, the calls of a joint step; `[d_model]` alone is quicker.
        kernels: Refine only these mamba-ssm kernels (e.g. _chunk_scan_fwd_kernel); the others run
            their default choice untimed. None: all.
        all_blocks: Vary every block size in a kernel's list, not only the one mamba-ssm's
            autotuner chooses at the full width.
        warps: Numbers of warps to try; None: 2, 4, 8.
        stages: Numbers of pipeline stages to try; None: 1, 2, 3, 4.
        min_gain: Pin a configuration only where it beats the default's pick by more than this
            fraction (smaller differences are within the timer's repeatability).
        out: Path of the table to write.

    Raises:
        ValueError: For widths that are not the preset's, or not with the full width first.
        RuntimeError: Without a CUDA GPU.
    """
    warps = [2, 4, 8] if warps is None else list(warps)
    stages = [1, 2, 3, 4] if stages is None else list(stages)
    config = MatMambaConfig.from_name(preset)
    widths = check_widths(config.d_model, widths)
    if not torch.cuda.is_available():
        raise RuntimeError("tuning times mamba-ssm's Triton kernels on a CUDA GPU; none is here")
    pin_ssd_configs("off")  # tuning starts from mamba-ssm's own lists
    t0 = time.time()

    def say(msg: str) -> None:
        print(f"[{time.time() - t0:6.1f} s] {msg}", flush=True)

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = MatMambaLM(config)
    ids = torch.randint(0, config.vocab_size, (batch, seq + 1), device="cuda")
    table_path = Path(out)
    report_path = table_path.with_suffix(".report.json")
    table_path.parent.mkdir(parents=True, exist_ok=True)
    result: dict = {}

    def write(rec: Recorder, measured: list[int]) -> None:
        """The report and table over the widths measured so far."""
        report, table = choose(rec.timings, rec.calls, measured, min_gain)
        pinned = {(name, tuple(e["key"])) for name, entries in table.items() for e in entries}
        saving = sum(
            e["step_ms_default"] - e["step_ms_best"]
            for e in report
            if (e["kernel"], tuple(e["key"])) in pinned
        )
        result.clear()
        result.update(
            preset=preset,
            batch=batch,
            seq=seq,
            device=torch.cuda.get_device_name(),
            widths=measured,
            warps=warps,
            stages=stages,
            min_gain=min_gain,
            predicted_saving_ms=saving,
            kernels=report,
            table=table,
        )
        report_path.write_text(json.dumps(result, indent=2, default=str))
        table_path.write_text(json.dumps(table, indent=2))
        for e in report:
            say(
                f"{e['kernel']} {e['key'][:3]}: {e['step_ms_default']:.2f} -> {e['step_ms_best']:.2f} ms "
                f"({e['best_config']['num_warps']} warps, {e['best_config']['num_stages']} stages)"
            )
        say(
            f"widths {measured}: predicted saving {saving:.2f} ms a joint step; wrote {table_path}, {report_path}"
        )

    only = set(kernels) if kernels else None
    measure(model, ids, widths, warps, stages, say, done=write, kernels=only, all_blocks=all_blocks)
    return result


def check_widths(d_model: int, widths: list[int] | None) -> list[int]:
    """The widths to time: the four nested widths d_model / 1, 2, 4, 8 if None, else `widths` checked
    to be some of them with the full width first (the default autotuner's pick is the full width's)."""
    nested = [d_model // f for f in (1, 2, 4, 8)]
    if widths is None:
        return nested
    widths = [int(w) for w in widths]
    if not widths or widths[0] != d_model or not set(widths) <= set(nested):
        raise ValueError(f"widths {widths}: give some of {nested}, the full width {d_model} first")
    return widths


def config_id(config) -> str:
    """A configuration as JSON text: block sizes, warps and stages (what a table entry holds)."""
    return json.dumps(
        dict(kwargs=dict(config.kwargs), num_warps=config.num_warps, num_stages=config.num_stages),
        sort_keys=True,
    )


class Recorder:
    """Wraps each autotuner's `run`: counts calls per (kernel, key, width) and keeps the timings of
    every tuning (configuration id -> median ms)."""

    def __init__(self, tuners) -> None:
        self.width = None
        self.calls = defaultdict(int)  # (name, key, width) -> calls
        self.timings = {}  # (phase, name, key, width) -> {config id: ms}
        self.phase = "default"
        for tuner in tuners:
            self._wrap(tuner)

    def _wrap(self, tuner) -> None:
        name, run = tuner.base_fn.__name__, tuner.run

        def recorded(*args, **kwargs):
            before = set(tuner.cache)
            out = run(*args, **kwargs)
            for key in set(tuner.cache) - before:
                times = getattr(tuner, "configs_timings", None) or {}
                self.timings[(self.phase, name, key, self.width)] = {
                    config_id(c): (t[0] if isinstance(t, (list, tuple)) else t) for c, t in times.items()
                }
            if self.phase == "default":  # counted under the key the autotuner computes
                self.calls[(name, self._key(tuner, args, kwargs), self.width)] += 1
            return out

        tuner.run = recorded

    def unwrap(self, tuners) -> None:
        for tuner in tuners:
            tuner.__dict__.pop("run", None)  # the class's `run` again

    @staticmethod
    def _key(tuner, args, kwargs):
        named = {**dict(zip(tuner.arg_names, args)), **kwargs}
        named = {k: v for k, v in named.items() if k in tuner.arg_names}
        key = [named[k] for k in tuner.keys if k in named]
        key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
        return tuple(key)


def choose(timings: dict, calls: dict, widths: list[int], min_gain: float = 0.0) -> tuple[list[dict], dict]:
    """For each (kernel, key) tuned in the default phase: the configuration the default autotuner
    runs (its best at the first, full width), and the one with the least call-weighted time over all
    widths among those the refined phase timed. Returns the report and the table of pins: only the
    keys where the best is faster than the default's pick by more than `min_gain` (a fraction).

    timings: (phase, kernel, key, width) -> {config id: ms}; calls: (kernel, key, width) -> count."""
    full, report, table = widths[0], [], {}
    for name, key in sorted({(n, k) for (p, n, k, _) in timings if p == "default"}, key=str):
        default = {w: timings.get(("default", name, key, w), {}) for w in widths}
        refined = {w: timings.get(("refined", name, key, w), {}) for w in widths}
        if not default[full] or not all(refined.values()):
            continue
        n_calls = {w: calls.get((name, key, w), 0) for w in widths}

        def ms(cid: str, w: int, default=default, refined=refined) -> float:
            return refined[w].get(cid, default[w].get(cid, math.inf))

        picked = min(default[full], key=default[full].get)  # what the default autotuner runs everywhere
        candidates = sorted(set(itertools.chain.from_iterable(refined[w] for w in widths)))
        best = min(candidates, key=lambda c: sum(n_calls[w] * ms(c, w) for w in widths))
        before = sum(n_calls[w] * default[w].get(picked, math.inf) for w in widths)
        after = sum(n_calls[w] * ms(best, w) for w in widths)
        report.append(
            dict(
                kernel=name,
                key=list(key),
                calls=n_calls,
                default_config=json.loads(picked),
                default_ms_per_width={w: default[w].get(picked) for w in widths},
                best_config=json.loads(best),
                best_ms_per_width={w: ms(best, w) for w in widths},
                step_ms_default=before,
                step_ms_best=after,
            )
        )
        if after < before * (1 - min_gain):
            table.setdefault(name, []).append(dict(key=list(key), **json.loads(best)))
    return report, table


def measure(
    model,
    ids: torch.Tensor,
    widths: list[int],
    warps: list[int],
    stages: list[int],
    say=print,
    done=None,
    kernels: set[str] | None = None,
    all_blocks: bool = False,
) -> Recorder:
    """The default then the refined phase (module docstring) at `widths` (the full width first);
    returns the recorded calls and timings, and passes them to `done(recorder, widths so far)` after
    each width of the refined phase. mamba-ssm's configuration lists are restored afterwards.
    `kernels`: refine only these (the others run their default pick untimed); `all_blocks`: vary
    every block size in the kernel's list, not only the one it chose."""
    mamba_ssm_compat.get_ssd_internals()
    tuners = mamba_ssm_compat.autotuners_by_name()
    originals = {name: list(t.configs) for name, t in tuners.items()}
    rec = Recorder(tuners.values())

    def each_width(phase: str) -> None:
        rec.phase = phase
        for w in widths:
            mamba_ssm_compat.clear_autotuning(pins=False)
            rec.width = w
            with torch.autocast(ids.device.type, dtype=torch.bfloat16):
                loss = model.loss(ids, w)
            loss.backward()
            model.zero_grad(set_to_none=True)
            if ids.is_cuda:
                torch.cuda.synchronize()
            say(f"{phase}: width {w} done")
            if phase == "refined" and done is not None:
                done(rec, widths[: widths.index(w) + 1])

    try:
        each_width("default")
        # The block sizes each kernel chose at full width (any key), with every warps x stages.
        for name, tuner in tuners.items():
            chosen = {
                min(times, key=times.get)
                for (_, n, _, w), times in rec.timings.items()
                if n == name and w == widths[0] and times
            }
            if not chosen:
                continue
            if kernels is not None and name not in kernels:
                pick = sorted(chosen)[0]
                tuner.configs = [next(c for c in originals[name] if config_id(c) == pick)]  # untimed
                continue
            bases = [next(c for c in originals[name] if config_id(c) == cid) for cid in sorted(chosen)]
            if all_blocks:
                bases = list({json.dumps(c.kwargs, sort_keys=True): c for c in originals[name]}.values())
            variants = {}
            for base in bases:
                for nw, ns in itertools.product(warps, stages):
                    c = mamba_ssm_compat.config_variant(base, nw, ns)
                    variants.setdefault(config_id(c), c)
            tuner.configs = list(variants.values())
            say(f"{name}: {len(variants)} variants of {len(bases)} block size(s)")
        each_width("refined")
    finally:
        rec.unwrap(tuners.values())
        for name, tuner in tuners.items():
            tuner.configs = originals[name]
        mamba_ssm_compat.clear_autotuning()
    return rec
