"""`main.py search`: the per-layer widths with the best validation metric under a budget.

One run:

1. Space: every layer takes one of `choices` (default: the granularities the checkpoint was
   trained at). The cost of a width is the parameters it uses (`model.num_params`), its inference
   FLOPs per token (`model.flops_per_token`), or the milliseconds of a forward pass of
   (batch_size, seq_len) on this device, predicted from a latency table measured here first (each
   layer's time at each width plus the rest of the model, as once-for-all's tables do); the
   frontier's latencies are then also measured end to end.
2. Proxy: the metric on the first `proxy_batches` validation batches.
3. Evolution (NSGA-II on cost and proxy metric): a population seeded with the paper's rules
   (uniform widths, pyramids, inverted pyramids) and random widths, each repaired to the budget
   by narrowing random layers; children by uniform crossover of tournament winners and mutation
   of each layer to a neighbouring width with probability `mutation`; survivors by Pareto rank
   and crowding distance. A space whose widths under the budget number no more than the
   evaluation budget (`population * (generations + 1)`) is searched exhaustively instead.
4. Confirmation: up to `confirm_max` points of the proxy's Pareto frontier and the rules' widths
   are evaluated on the next `confirm_batches` validation batches, which the proxy never saw. The
   frontier is the confirmed points that no cheaper confirmed point matches or beats, so it is
   monotone (more budget is never worse); the chosen width is its best point.
5. With `final_split` (e.g. test), the frontier and the rules' widths at the budget are evaluated
   on that split too, data that took no part in choosing them.

The paper's rules: uniform widths for language models; for vision Mix'n'Match, pyramids (wider
early layers: the first j layers at one granularity, the rest at the next smaller one) and
inverted pyramids (narrower early layers). A rule's width at a budget is its most expensive width
within the budget.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning import LightningDataModule

from lit_matmamba.io import Pretrained, atomic_directory, load
from lit_matmamba.models import MatMambaLM, NestedModel

from .common import pick_device, run

Widths = tuple[int, ...]
BUDGETS = ("params", "flops", "latency_ms")
RULES = ("uniform", "pyramid", "inverted_pyramid")


# Budgets and costs ------------------------------------------------------------------------------
def parse_budget(text: str) -> tuple[str, float]:
    """`params=2.1e6`, `params=2.1M`, `flops=5e6` (inference FLOPs per token), `latency_ms=4.5`."""
    m = re.fullmatch(r"\s*(\w+)\s*=\s*([0-9.eE+-]+)\s*([kKmMgGtT]?)\s*", text)
    kind = m.group(1) if m else None
    if m is None or kind not in BUDGETS:
        raise ValueError(f"budget {text!r}: give params=N, flops=N or latency_ms=N (N may end in k, M, G)")
    try:
        value = float(m.group(2)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[m.group(3).lower()]
    except ValueError:
        raise ValueError(f"budget {text!r}: {m.group(2)!r} is not a number") from None
    if value <= 0:
        raise ValueError(f"budget {text!r} must be positive")
    return kind, value


def _median_ms(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 2) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


class LatencyTable:
    """Milliseconds of a forward pass of `example` at a width, predicted as the rest of the model
    plus each layer's time at its width, all measured on this device at construction."""

    def __init__(self, model: NestedModel, example: torch.Tensor, widths: Sequence[int], reps: int = 10):
        self.model, self.example, self.reps = model, example, reps
        self.device = example.device
        cfg = model.config
        with torch.inference_mode():
            length = example.shape[1] if isinstance(model, MatMambaLM) else cfg.num_patches + 1
            h = torch.randn(example.shape[0], length, cfg.d_model, device=self.device)  # (B, L, D)
            self.layer_ms = {}
            for w in sorted(set(widths)):
                layer = next(lay for lay, full in zip(model.backbone.layers, cfg.layer_widths) if full >= w)
                self.layer_ms[w] = _median_ms(lambda layer=layer, w=w: layer(None, h, w), self.device, reps)
            uniform = [w for w in self.layer_ms if all(w <= full for full in cfg.layer_widths)]
            rest = [self.measure((w,) * cfg.n_layer) - cfg.n_layer * self.layer_ms[w] for w in uniform]
        self.rest_ms = max(0.0, statistics.median(rest))

    def __call__(self, widths: Widths) -> float:
        return self.rest_ms + sum(self.layer_ms[w] for w in widths)

    @torch.inference_mode()
    def measure(self, widths: Widths) -> float:
        """The forward pass at `widths`, timed end to end (median of `reps`)."""
        return _median_ms(lambda: self.model(self.example, list(widths)), self.device, self.reps)


# Evaluation -----------------------------------------------------------------------------------
class Scorer:
    """The metric of a width over fixed batches, through the model's own loss (`loss`) or its
    predictions (`top1`, vision), weighted by tokens or images."""

    def __init__(self, model: NestedModel, batches: list[Any], metric: str) -> None:
        self.model, self.batches, self.metric = model, batches, metric
        self.evaluations = 0

    @torch.inference_mode()
    def __call__(self, widths: Widths) -> float:
        self.evaluations += 1
        total = weight = 0.0
        for batch in self.batches:
            if isinstance(self.model, MatMambaLM):
                n = batch[:, 1:].numel()
                value = self.model.loss(batch, list(widths))
            else:
                images, targets = batch
                n = targets.shape[0]
                if self.metric == "loss":
                    value = self.model.loss(images, targets, list(widths))
                else:
                    value = (self.model(images, list(widths)).argmax(-1) == targets).float().mean()
            total += float(value) * n
            weight += n
        return total / weight


# Pareto frontiers ---------------------------------------------------------------------------------
def pareto(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, badness) that no other point matches or beats in both, by
    increasing cost; of equal points the first."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1], i))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def _fronts(points: Sequence[tuple[float, float]]) -> list[list[int]]:
    """Non-dominated sorting (NSGA-II): the first front, then the first of the rest, ..."""
    left, fronts = set(range(len(points))), []
    while left:
        front = [
            i
            for i in left
            if not any(
                points[j][0] <= points[i][0] and points[j][1] <= points[i][1] and points[j] != points[i]
                for j in left
            )
        ]
        fronts.append(sorted(front))
        left -= set(front)
    return fronts


def _crowding(front: list[int], points: Sequence[tuple[float, float]]) -> dict[int, float]:
    distance = dict.fromkeys(front, 0.0)
    for k in range(2):
        ordered = sorted(front, key=lambda i: points[i][k])
        span = points[ordered[-1]][k] - points[ordered[0]][k] or 1.0
        distance[ordered[0]] = distance[ordered[-1]] = math.inf
        for a, i, b in zip(ordered, ordered[1:], ordered[2:]):
            distance[i] += (points[b][k] - points[a][k]) / span
    return distance


def _ranks(widths: list[Widths], points: list[tuple[float, float]]) -> dict[Widths, tuple[int, float]]:
    """(front, -crowding distance) of each width: smaller is better."""
    out = {}
    for r, front in enumerate(_fronts(points)):
        crowd = _crowding(front, points)
        for i in front:
            out[widths[i]] = (r, -crowd[i])
    return out


def evolve(
    space: Sequence[Sequence[int]],
    cost: Callable[[Widths], float],
    score: Callable[[Widths], float],
    budget: float,
    population: int = 16,
    generations: int = 8,
    mutation: float = 0.3,
    seeds: Sequence[Widths] = (),
    rng: random.Random | None = None,
) -> tuple[dict[Widths, float], str]:
    """Search `space` (each layer's widths, ascending) for widths with a low `score` (lower is
    better) whose `cost` is within `budget`. Returns every evaluated width with its score, and
    "exhaustive" or "evolution" (module docstring)."""
    rng = rng or random.Random(0)
    n = len(space)
    smallest = tuple(c[0] for c in space)
    if cost(smallest) > budget:
        raise ValueError(
            f"no width meets the budget: the smallest, {list(smallest)}, costs {cost(smallest):.6g}"
        )
    archive: dict[Widths, float] = {}

    def evaluate(w: Widths) -> float:
        if w not in archive:
            archive[w] = score(w)
        return archive[w]

    limit = population * (generations + 1)
    if math.prod(len(c) for c in space) <= 100_000:
        feasible = [w for w in itertools.product(*space) if cost(w) <= budget]
        if len(feasible) <= limit:
            for w in feasible:
                evaluate(w)
            return archive, "exhaustive"

    def repair(w: Widths) -> Widths:
        w = list(w)
        while cost(tuple(w)) > budget:
            i = rng.choice([i for i in range(n) if w[i] > space[i][0]])
            w[i] = space[i][space[i].index(w[i]) - 1]
        return tuple(w)

    def mutate(w: Widths) -> Widths:
        out = list(w)
        for i, c in enumerate(space):
            if rng.random() < mutation:
                j = c.index(out[i]) + rng.choice((-1, 1))
                out[i] = c[min(max(j, 0), len(c) - 1)]
        return tuple(out)

    pop = list(dict.fromkeys(repair(w) for w in seeds))[:population]
    for _ in range(20 * population):
        if len(pop) >= population:
            break
        w = repair(tuple(rng.choice(c) for c in space))
        if w not in pop:
            pop.append(w)
    for w in pop:
        evaluate(w)
    for _ in range(generations):
        ranks = _ranks(pop, [(cost(w), archive[w]) for w in pop])
        children: list[Widths] = []
        for _ in range(20 * population):
            if len(children) >= population:
                break
            a, b = (_tournament(pop, ranks, rng) for _ in range(2))
            child = repair(mutate(tuple(rng.choice(pair) for pair in zip(a, b))))
            if child not in archive and child not in children:
                children.append(child)
        for w in children:
            evaluate(w)
        union = pop + children
        ranks = _ranks(union, [(cost(w), archive[w]) for w in union])
        pop = sorted(union, key=ranks.__getitem__)[:population]
    return archive, "evolution"


def _tournament(pop: list[Widths], ranks: dict[Widths, tuple[int, float]], rng: random.Random) -> Widths:
    """The better (by Pareto rank, then crowding) of two random members of `pop`."""
    a, b = rng.sample(pop, 2) if len(pop) > 1 else (pop[0], pop[0])
    return min(a, b, key=ranks.__getitem__)


def rule_widths(rule: str, granularities: Sequence[int], n_layer: int) -> list[Widths]:
    """The widths a rule of the paper builds from the granularities (module docstring)."""
    grans = sorted(set(granularities), reverse=True)
    out = [(g,) * n_layer for g in grans]
    if rule == "uniform":
        return out
    for big, small in zip(grans, grans[1:]):
        for j in range(1, n_layer):
            wide_first = (big,) * j + (small,) * (n_layer - j)
            out.append(wide_first if rule == "pyramid" else wide_first[::-1])
    return out


# The command ----------------------------------------------------------------------------------
def _datamodule(pretrained: Pretrained, data: LightningDataModule | None) -> LightningDataModule:
    if data is not None:
        return data
    # Lightning's own keys besides the class path (e.g. "_instantiator") are not arguments.
    hparams = {
        k: v for k, v in (pretrained.data or {}).items() if k == "_class_path" or not k.startswith("_")
    }
    if "_class_path" not in hparams:
        raise ValueError(
            f"{pretrained.source} does not record its data module (it was not trained through main.py fit): "
            "pass --data (a LightningDataModule class path with its init_args, or a YAML file)"
        )
    if "num_workers" in hparams:
        hparams["num_workers"] = 0  # a few batches, read in order: no worker processes
    from lightning.pytorch.cli import instantiate_module

    return instantiate_module(LightningDataModule, hparams)


def _batches(datamodule: Any, split: str, skip: int, count: int | None, device: torch.device) -> list[Any]:
    datamodule.prepare_data()
    datamodule.setup("validate" if split == "val" else split)
    loader = getattr(datamodule, f"{split}_dataloader")()
    stop = None if count is None else skip + count
    out = []
    for batch in itertools.islice(loader, skip, stop):
        if isinstance(batch, torch.Tensor):
            out.append(batch.to(device))
        else:
            out.append(tuple(t.to(device) for t in batch))
    return out


def _point(widths: Widths, costs: dict[str, Callable[[Widths], float]], **values: float) -> dict[str, Any]:
    return {"width": list(widths), **{k: fn(widths) for k, fn in costs.items()}, **values}


def search(
    ckpt_path: str,
    budget: str,
    output: str = "search",
    data: LightningDataModule | None = None,
    metric: Literal["loss", "top1"] = "loss",
    choices: list[int] | Literal["all"] | None = None,
    population: int = 16,
    generations: int = 8,
    mutation: float = 0.3,
    proxy_batches: int = 4,
    confirm_batches: int = 16,
    confirm_max: int = 12,
    final_split: str | None = None,
    final_batches: int | None = None,
    batch_size: int = 1,
    seq_len: int | None = None,
    device: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Find the per-layer widths with the best validation metric under a budget, and the Pareto
    frontier of metric against cost around them.

    Writes OUTPUT/frontier.json (the frontier, the chosen width, the paper's rules at the budget,
    every setting evaluated), OUTPUT/frontier.png and the same figure to TensorBoard (OUTPUT, tag
    search/frontier), and prints the `export` command for the chosen width. The algorithm:
    `lit_matmamba/deploy/search.py`'s docstring.

    Args:
        ckpt_path: a training checkpoint (.ckpt) or an exported model directory.
        budget: params=N (parameters used), flops=N (inference FLOPs per token at seq_len) or
            latency_ms=N (a forward pass of batch_size x seq_len on this device); N may end in
            k, M or G.
        output: the directory to create for the results; it must not exist.
        data: the data module whose validation split scores widths (class_path and init_args, or
            a YAML file); default: the one the checkpoint was trained with.
        metric: loss (lower is better), or top1 accuracy for vision models (higher is better).
        choices: the widths each layer may take; default the trained granularities; "all": every
            valid width (whole heads), trained or not.
        population: candidates per generation.
        generations: generations of the evolutionary search.
        mutation: probability that a child's layer moves to a neighbouring width.
        proxy_batches: validation batches that score every candidate (the cheap proxy).
        confirm_batches: the next validation batches, which re-score the frontier.
        confirm_max: at most this many frontier points are confirmed.
        final_split: also evaluate the frontier and the rules on this split (e.g. test).
        final_batches: batches of final_split (default: all of it).
        batch_size: sequences (or images) per forward pass for latency_ms.
        seq_len: tokens per sequence for latency_ms and flops (default: the trained length, else
            the chunk size).
        device: cpu, cuda, ... (default: cuda when there is a GPU); latency is measured there.
        seed: seed of the evolutionary search.
    """
    kind, limit = parse_budget(budget)
    if min(population, proxy_batches, confirm_batches, confirm_max) < 1 or generations < 0:
        raise ValueError("population, proxy_batches, confirm_batches and confirm_max must be at least 1")
    dev = pick_device(device)
    pretrained = load(ckpt_path, map_location=dev)
    model = pretrained.model.eval()
    cfg = model.config
    is_lm = isinstance(model, MatMambaLM)
    if metric == "top1" and is_lm:
        raise ValueError("metric top1 is for vision models; language models are scored by their loss")
    if choices == "all":
        step = cfg.width_step
        options = list(range(step, max(cfg.layer_widths) + 1, step))
    else:
        options = sorted(set(choices or pretrained.granularities))
        for w in options:  # each choice checked by resolve at every layer wide enough for it
            if w > max(cfg.layer_widths):
                raise ValueError(
                    f"choice {w} is wider than every layer (layer widths {list(cfg.layer_widths)})"
                )
            cfg.resolve([w if w <= full else full for full in cfg.layer_widths])
    space = [[w for w in options if w <= full] for full in cfg.layer_widths]
    if any(not c for c in space):
        raise ValueError(
            f"choices {options} leave a layer without a width (layer widths {list(cfg.layer_widths)})"
        )
    length = seq_len or pretrained.seq_len or cfg.chunk_size

    costs: dict[str, Callable[[Widths], float]] = {
        "params": lambda w: model.num_params(list(w)),
        "flops": lambda w: model.flops_per_token(list(w), training=False, seq_len=length),
    }
    table = None
    if kind == "latency_ms":
        if is_lm:
            example = torch.randint(0, cfg.vocab_size, (batch_size, length), device=dev)
        else:
            example = torch.randn(batch_size, cfg.in_chans, cfg.img_size, cfg.img_size, device=dev)
        table = LatencyTable(model, example, options)
        costs["latency_ms"] = table
    cost = costs[kind]
    smallest = tuple(c[0] for c in space)
    if cost(smallest) > limit:
        raise ValueError(
            f"no width meets the budget {kind}={limit:.6g}: the smallest, {list(smallest)}, costs {cost(smallest):.6g}"
        )

    datamodule = _datamodule(pretrained, data)
    batches = _batches(datamodule, "val", 0, proxy_batches + confirm_batches, dev)
    if len(batches) <= proxy_batches:
        raise ValueError(
            f"the validation split has {len(batches)} batches: fewer proxy_batches ({proxy_batches}) are "
            "needed to leave batches for the confirmation"
        )
    proxy = Scorer(model, batches[:proxy_batches], metric)
    confirm = Scorer(model, batches[proxy_batches:], metric)
    sign = 1.0 if metric == "loss" else -1.0  # the search minimises `sign * metric`

    rules = {
        r: [w for w in rule_widths(r, pretrained.granularities, cfg.n_layer) if _fits(w, space)]
        for r in RULES
    }
    seeds = [w for r in RULES for w in rules[r] if cost(w) <= limit]
    started = time.perf_counter()
    archive, strategy = evolve(
        space,
        cost,
        lambda w: sign * proxy(w),
        limit,
        population=population,
        generations=generations,
        mutation=mutation,
        seeds=seeds,
        rng=random.Random(seed),
    )
    searched = list(archive)
    front = [searched[i] for i in pareto([(cost(w), archive[w]) for w in searched])]
    if len(front) > confirm_max:  # the best few, and the rest spread over the cost range
        best, rest = front[-min(3, confirm_max) :], front[: -min(3, confirm_max)]
        k = confirm_max - len(best)
        front = [rest[round(i * (len(rest) - 1) / max(k - 1, 1))] for i in range(k)] + best
    at_budget = {r: max((w for w in rules[r] if cost(w) <= limit), key=cost, default=None) for r in RULES}
    candidates = list(dict.fromkeys([*front, *(w for r in RULES for w in rules[r] if cost(w) <= limit)]))
    confirmed = {w: sign * confirm(w) for w in candidates}
    frontier = [candidates[i] for i in pareto([(cost(w), confirmed[w]) for w in candidates])]
    chosen = frontier[-1]
    seconds = time.perf_counter() - started

    final = None
    if final_split is not None:
        final_data = _batches(datamodule, final_split, 0, final_batches, dev)
        if not final_data:
            raise ValueError(f"the {final_split} split has no batches")
        final_scorer = Scorer(model, final_data, metric)
        final = {
            w: final_scorer(w) for w in dict.fromkeys([*frontier, *(w for w in at_budget.values() if w)])
        }

    points: dict[Widths, dict[str, Any]] = {}

    def point(w: Widths) -> dict[str, Any]:
        # Once per width: the chosen width is also the frontier's last, and a rule's may be on it
        # (its latency is measured end to end, so the same width would be timed twice).
        if w not in points:
            values = {"proxy": sign * archive[w] if w in archive else None, "confirm": sign * confirmed[w]}
            if final is not None and w in final:
                values["final"] = final[w]
            if table is not None:
                values["latency_ms_measured"] = table.measure(w)
            points[w] = _point(w, costs, **values)
        return points[w]

    result: dict[str, Any] = {
        "source": str(ckpt_path),
        "model": type(model).__name__,
        "budget": {"kind": kind, "value": limit, "seq_len": length}
        | ({"batch_size": batch_size, "device": str(dev)} if kind == "latency_ms" else {}),
        "metric": metric,
        "higher_is_better": metric != "loss",
        "space": {
            "choices": space,
            "strategy": strategy,
            "evaluated": len(archive),
            "seconds": round(seconds, 1),
        },
        "data": {
            "proxy": f"val batches 0-{proxy_batches - 1}",
            "confirm": f"val batches {proxy_batches}-{len(batches) - 1}",
            "final": None if final_split is None else f"{final_split} ({len(final_data)} batches)",
        },
        "chosen": point(chosen),
        "frontier": [point(w) for w in frontier],
        "rules_at_budget": {r: None if w is None else point(w) for r, w in at_budget.items()},
        "evaluated": [_point(w, costs, proxy=sign * archive[w]) for w in searched],
    }
    if table is not None:
        result["latency_table_ms"] = {"rest": table.rest_ms, **{str(w): t for w, t in table.layer_ms.items()}}
    width_arg = ",".join(str(w) for w in chosen)
    result["export"] = (
        f"python main.py export --ckpt_path {ckpt_path} --width {width_arg} --output EXPORT_DIR"
    )
    _write(result, Path(output), kind)
    _summary(result, kind)
    return result


def _fits(widths: Widths, space: Sequence[Sequence[int]]) -> bool:
    return all(w in c for w, c in zip(widths, space))


def _write(result: dict[str, Any], output: Path, kind: str) -> None:
    from torch.utils.tensorboard import SummaryWriter

    from lit_matmamba import plots

    split = "final" if result["data"]["final"] else "confirm"
    where = result["data"][split].split(" ")[0] if split == "final" else "the confirmation batches"
    metric = result["metric"]

    def for_plot(points: list[dict[str, Any] | None]) -> list[dict[str, Any]]:
        return [{**p, metric: p[split]} for p in points if p and p.get(split) is not None]

    series = {"frontier (search)": for_plot(result["frontier"])}
    series |= {
        rule.replace("_", " ") + " (rule)": for_plot([p])
        for rule, p in result["rules_at_budget"].items()
        if p
    }
    series["chosen"] = for_plot([result["chosen"]])
    budget = result["budget"]
    fig = plots.quality_vs_params(
        series,
        metric,
        title=f"{result['model']}: {metric} on {where}, budget {kind}={budget['value']:.4g}",
        lines=["frontier (search)"],
        x=kind,
    )
    scale = 1e-6 if kind == "params" else 1.0
    fig.axes[0].axvline(budget["value"] * scale, color="grey", linestyle="--", linewidth=1)
    with atomic_directory(output) as tmp:
        (tmp / "frontier.json").write_text(json.dumps(result, indent=2))
        writer = SummaryWriter(log_dir=str(tmp))
        writer.add_figure("search/frontier", fig, close=False)
        writer.add_text("search/chosen", f"width {result['chosen']['width']}: {result['export']}")
        writer.close()
        plots.save(fig, tmp / "frontier.png")
    result["output"] = str(output)


def _summary(result: dict[str, Any], kind: str) -> None:
    metric, split = result["metric"], "final" if result["data"]["final"] else "confirm"
    space = result["space"]
    print(
        f"{space['strategy']} search: {space['evaluated']} widths scored on the proxy in {space['seconds']} s; "
        f"{len(result['frontier'])} on the confirmed frontier"
    )
    print(f"{'':18} {'width':>22} {kind:>12} {metric + ' (' + split + ')':>16}")
    rows = [("chosen", result["chosen"])] + [(r, p) for r, p in result["rules_at_budget"].items() if p]
    for name, p in rows:
        print(f"{name:18} {str(p['width']):>22} {p[kind]:>12.6g} {p.get(split, float('nan')):>16.4f}")
    print(f"wrote {result['output']}/frontier.json, frontier.png and a TensorBoard figure")
    print(result["export"])


def main(argv: list[str], prog: str = "python main.py search") -> None:
    run(search, argv, prog)
